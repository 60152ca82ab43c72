from setuptools import find_packages, setup

setup(
    name="fairseq-moe-prune",
    version="0.1.0",
    description="Record, rank and prune the experts of NLLB-style Mixture-of-Experts models in fairseq",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="MIT",
    packages=find_packages(include=["fairseq_moe_prune", "fairseq_moe_prune.*"]),
    python_requires=">=3.9",
    install_requires=[
        # fairseq 0.12.2 does not import on Python 3.11; the fork installs the same `fairseq` package
        "fairseq-fixed==0.12.3.1; python_version >= '3.11'",
        "fairseq==0.12.2; python_version < '3.11'",
        "torch>=2.6",
        "sentencepiece",
        "safetensors",  # calibration samples (reading them: prune --metric reconstruction)
        "sacrebleu>=2.0",
        "omegaconf",
        "numpy>=1.21.3",
    ],
    extras_require={
        "test": ["pytest"],
        # conversion to and from Hugging Face's NllbMoe; transformers 5.x routes NllbMoe tokens to the
        # wrong experts (see fairseq_moe_prune/checkpoints/hf.py)
        "hf": ["transformers>=4.30,<5", "protobuf"],  # protobuf: reading the SentencePiece model
        # CTranslate2 (int8 on CPUs) for extracted sub-networks, through their M2M100 form
        "deploy": ["ctranslate2>=4.5"],
        # experts offloaded to host memory or placed over devices (fairseq_moe_prune/moe/placement.py)
        "offload": ["accelerate>=0.26"],
        # the main job's report plots (examples/libreoffice_help)
        "examples": ["matplotlib"],
    },
    entry_points={"console_scripts": ["fairseq-moe-prune = fairseq_moe_prune.cli:main"]},
)
