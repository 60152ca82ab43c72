"""Calibration samples: per MoE layer and language pair, a bounded uniform sample of real tokens.

For each sampled token we keep what the reconstruction-loss search needs (Lu et al. 2024): the MoE
block's input X, its gate's full softmax P and its output Z. The recording hook hands the sampler
exactly the tokens the statistics count (real encoder tokens; decoder tokens of the final
hypotheses), so samples and counts describe the same run.

Sampling is a keyed reservoir (bottom-N keys): every token gets a uniform random key from a
``torch.Generator`` seeded by ``--seed``, the pair and the layer, and the N tokens with the smallest
keys are kept. That is a uniform sample of the run whatever its length, it is deterministic, and
two samples merge exactly: the bottom N of the union of two bottom-N sets is the bottom N of the
union of the runs (each run's tokens weigh by how many it saw, through the keys). Runs over shards
of one pair should use different ``--seed`` values, so that their keys are independent. Memory and
disk are bounded by N per layer and pair.

The file is safetensors (``{pair}/{layer prefix}/{inputs,probs,outputs,keys}``), with the model
fingerprint, the settings and the tokens seen per layer in its metadata, written atomically.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Set, Tuple

import torch
from safetensors import SafetensorError, safe_open
from torch import Tensor

from fairseq_moe_prune.files import WrittenAtExit, atomic_open, is_regular_file, make_folder, regular_files
from fairseq_moe_prune.layout import MoELayerSpec
from fairseq_moe_prune.moe.layer import RoutingRecord
from fairseq_moe_prune.stats import Fingerprint, StatsError, split_pair, whole_number

FORMAT = "fairseq-moe-prune/calibration"
VERSION = 2  # 2: the fingerprint covers the experts; outputs are the no-drop argmax top-2 output (see below)
FIELDS = ("inputs", "probs", "outputs", "keys")
FILE_SUFFIX = ".safetensors"
TARGET_OUTPUTS = "argmax top-k, no capacity drop"  # settings["outputs"]: how Z was computed (CalibrationSampler)


class CalibrationError(StatsError):
    """A calibration file is unreadable or does not fit what it is used with."""


@dataclass
class LayerSample:
    """A uniform sample of one layer's real tokens: ``seen`` tokens went by, ``len(keys)`` were kept."""

    inputs: Tensor  # (n, d) float32, the MoE block's input
    probs: Tensor  # (n, E) float32, the gate's softmax over all experts
    outputs: Tensor  # (n, d) float32, the MoE block's output
    keys: Tensor  # (n,) float64, ascending reservoir keys
    seen: int  # real tokens the sample was drawn from

    @classmethod
    def empty(cls, dim: int, num_experts: int) -> "LayerSample":
        return cls(torch.zeros(0, dim), torch.zeros(0, num_experts), torch.zeros(0, dim),
                   torch.zeros(0, dtype=torch.float64), 0)

    @property
    def size(self) -> int:
        return int(self.keys.shape[0])

    def merged(self, other: "LayerSample", capacity: int) -> "LayerSample":
        """The ``capacity`` smallest keys of both: a uniform sample of both runs together."""
        keys = torch.cat([self.keys, other.keys])
        order = torch.argsort(keys, stable=True)[:capacity]
        return LayerSample(
            torch.cat([self.inputs, other.inputs])[order],
            torch.cat([self.probs, other.probs])[order],
            torch.cat([self.outputs, other.outputs])[order],
            keys[order],
            self.seen + other.seen,
        )


@dataclass
class Calibration:
    fingerprint: Fingerprint
    settings: Dict[str, Any]  # how the tokens were gathered (decoder tokens, beam, tokens per layer)
    pairs: Dict[str, Dict[str, LayerSample]] = field(default_factory=dict)  # pair -> layer prefix -> sample

    @property
    def capacity(self) -> int:
        return int(self.settings["tokens"])


def key_generator(seed: int, pair: str, prefix: str) -> torch.Generator:
    """Reservoir keys of one (pair, layer): its own stream, so layers and pairs never share keys."""
    digest = hashlib.sha256(f"{seed}:{pair}:{prefix}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))


# (layer index, inputs, gate softmax) -> the layer's output as reconstruction assumes it (see CalibrationSampler)
Target = Callable[[int, Tensor, Tensor], Tensor]


class CalibrationSampler:
    """Keeps a reservoir per (pair, layer); fed by the recorder's observer, committed per batch.

    The output Z kept for a token is what the reconstruction search takes the unpruned layer to compute:
    each token sent to its top-k experts by argmax of the full softmax, weights renormalised, nothing dropped
    for capacity (``target``, given by the recorder, runs the layer's own experts that way). The live
    output differs where the model samples its second expert (``sampling`` / ``random`` policies) or drops
    tokens for capacity (an eval capacity fraction below 1, NLLB's default): a target holding that routing
    would ask the pruned layer for something no kept set computes. Only the tokens that enter the reservoir
    are computed again. Without ``target`` (tests, tools feeding their own layers) the live output is kept.
    """

    def __init__(self, specs: List[MoELayerSpec], fingerprint: Fingerprint, settings: Dict[str, Any], seed: int,
                 target: Optional[Target] = None):
        self.specs = specs
        self.target = target
        self.fingerprint = fingerprint
        self.settings = settings
        self.capacity = int(settings["tokens"])
        if self.capacity < 1:
            raise CalibrationError(f"--moe-calibration-tokens must be at least 1, got {self.capacity}")
        self.seed = int(seed)
        # per layer index, this batch's real tokens: (inputs, probs, outputs) pieces
        self.pending: Dict[int, List[Tuple[Tensor, Tensor, Tensor]]] = {}
        self.reservoirs: Dict[str, Dict[int, LayerSample]] = {}
        self.generators: Dict[Tuple[str, int], torch.Generator] = {}

    def observe(self, index: int, record: RoutingRecord) -> None:
        """One forward of layer ``index``: keep its real tokens until the batch is committed."""
        inputs, probs, outputs = record.inputs, record.routing.probs, record.outputs
        if record.padding is not None:
            real = ~record.padding
            inputs, probs, outputs = inputs[real], probs[real], outputs[real]
        piece = (inputs.detach().float().cpu(), probs.detach().float().cpu(), outputs.detach().float().cpu())
        self.pending.setdefault(index, []).append(piece)

    def commit(self, pair: str) -> None:
        """The batch is complete: its tokens take their keys and compete for ``pair``'s reservoirs."""
        reservoirs = self.reservoirs.setdefault(pair, {})
        for index in sorted(self.pending):
            inputs, probs, outputs = (torch.cat(part) for part in zip(*self.pending[index]))
            generator = self.generators.get((pair, index))
            if generator is None:
                generator = key_generator(self.seed, pair, self.specs[index].prefix)
                self.generators[(pair, index)] = generator
            seen = int(inputs.shape[0])
            keys = torch.rand(seen, generator=generator, dtype=torch.float64)
            current = reservoirs.get(index)
            if current is None:
                current = LayerSample.empty(inputs.shape[1], probs.shape[1])
            # only tokens among the batch's smallest keys, and below the full reservoir's largest, can enter
            entering = torch.argsort(keys, stable=True)[:self.capacity]
            if current.size == self.capacity:
                entering = entering[keys[entering] < current.keys[-1]]
            entering = entering.sort().values
            inputs, probs, outputs, keys = inputs[entering], probs[entering], outputs[entering], keys[entering]
            if self.target is not None and len(entering):
                outputs = self.target(index, inputs, probs)
            reservoirs[index] = current.merged(LayerSample(inputs, probs, outputs, keys, seen), self.capacity)
        self.pending = {}

    def discard(self) -> None:
        self.pending = {}

    def snapshot(self) -> Calibration:
        calibration = Calibration(self.fingerprint, dict(self.settings), {})
        for pair, reservoirs in self.reservoirs.items():
            calibration.pairs[pair] = {self.specs[i].prefix: sample for i, sample in sorted(reservoirs.items())}
        return calibration


DTYPES = {torch.float32: "F32", torch.float64: "F64"}


def safetensors_bytes(tensors: Mapping[str, Tensor], metadata: Mapping[str, str]) -> bytes:
    """The safetensors encoding with its header in sorted order (the library's metadata order varies)."""
    header: Dict[str, Any] = {"__metadata__": dict(metadata)}
    offset, blobs = 0, []
    for name in sorted(tensors):
        tensor = tensors[name].contiguous()
        blob = tensor.reshape(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() else b""
        header[name] = {"dtype": DTYPES[tensor.dtype], "shape": list(tensor.shape),
                        "data_offsets": [offset, offset + len(blob)]}
        blobs.append(blob)
        offset += len(blob)
    text = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text + b"".join(blobs)


def save(calibration: Calibration, path: str) -> None:
    """Write one safetensors file atomically; the same samples give the same bytes."""
    tensors: Dict[str, Tensor] = {}
    seen: Dict[str, Dict[str, int]] = {}
    for pair, layers in sorted(calibration.pairs.items()):
        seen[pair] = {}
        for prefix, sample in layers.items():
            for name in FIELDS:
                tensors[f"{pair}/{prefix}/{name}"] = getattr(sample, name)
            seen[pair][prefix] = int(sample.seen)
    metadata = {
        "format": FORMAT,
        "version": str(VERSION),
        "model": json.dumps(calibration.fingerprint.to_json(), sort_keys=True),
        "settings": json.dumps(calibration.settings, sort_keys=True),
        "seen": json.dumps(seen, sort_keys=True),
    }
    data = safetensors_bytes(tensors, metadata)
    with atomic_open(path, "wb") as f:
        f.write(data)


def load_file(path: str) -> Calibration:
    try:
        with safe_open(path, framework="pt") as f:
            metadata = f.metadata() or {}
            if metadata.get("format") != FORMAT:
                raise CalibrationError(f"{path}: not a fairseq-moe-prune calibration file")
            if metadata.get("version") != str(VERSION):
                raise CalibrationError(f"{path}: calibration format version {metadata.get('version')} "
                                       f"is not supported (need {VERSION})")
            fingerprint = Fingerprint.from_json(json.loads(metadata["model"]))
            settings = json.loads(metadata["settings"])
            seen = json.loads(metadata["seen"])
            tensors = {key: f.get_tensor(key) for key in f.keys()}
        return checked(path, fingerprint, settings, seen, tensors)
    except FileNotFoundError:
        raise CalibrationError(f"{path}: no such calibration file") from None
    except (OSError, SafetensorError) as error:
        raise CalibrationError(f"{path}: not a readable calibration file ({error})") from None
    except (KeyError, TypeError, ValueError, AttributeError, RecursionError) as error:
        if isinstance(error, CalibrationError):
            raise
        raise CalibrationError(f"{path}: malformed calibration file ({type(error).__name__}: {str(error)[:80]})") from None


def checked(path: str, fingerprint: Fingerprint, settings: Mapping[str, Any], seen: Mapping[str, Any],
            tensors: Mapping[str, Tensor]) -> Calibration:
    """Build the samples from a file's tensors, refusing anything the metadata does not account for."""
    experts = dict(fingerprint.layers)
    if not isinstance(settings, dict) or type(settings.get("tokens")) is not int or settings["tokens"] < 1:
        raise CalibrationError(f"{path}: malformed calibration settings")
    calibration = Calibration(fingerprint, dict(settings), {})
    expected = set()
    for pair, layers in seen.items():
        try:
            split_pair(pair)
        except StatsError as error:
            raise CalibrationError(f"{path}: {error}") from None
        if not isinstance(layers, dict):
            raise CalibrationError(f"{path}: malformed language pair {pair!r}")
        calibration.pairs[pair] = {}
        for prefix, count in layers.items():
            if prefix not in experts:
                raise CalibrationError(f"{path}: unknown MoE layer {str(prefix)[:80]!r}")
            try:
                whole_number(count, f"{pair} {prefix}: tokens seen")
            except StatsError as error:
                raise CalibrationError(f"{path}: {error}") from None
            parts = {name: tensors.get(f"{pair}/{prefix}/{name}") for name in FIELDS}
            if any(t is None for t in parts.values()):
                raise CalibrationError(f"{path}: {pair} {prefix} lacks some of {', '.join(FIELDS)}")
            expected.update(f"{pair}/{prefix}/{name}" for name in FIELDS)
            sample = LayerSample(parts["inputs"].float(), parts["probs"].float(), parts["outputs"].float(),
                                 parts["keys"].double(), count)
            problem = sample_problem(sample, experts[prefix], settings["tokens"])
            if problem:
                raise CalibrationError(f"{path}: {pair} {prefix}: {problem}")
            calibration.pairs[pair][prefix] = sample
    if set(tensors) != expected:
        raise CalibrationError(f"{path}: tensors the metadata does not list")
    return calibration


PROB_TOLERANCE = 1e-3  # a softmax row, stored in float32, sums to 1 within this


def sample_problem(sample: LayerSample, num_experts: int, capacity: int) -> Optional[str]:
    """What is wrong with a sample read from a file (None: nothing): shapes that fit together, every value
    finite (a NaN would reach the search's sort and the skipping betas), probabilities that are softmax rows,
    keys ascending in [0, 1)."""
    if sample.keys.dim() != 1:
        return f"keys must be a list (1-D), got {sample.keys.dim()}-D"
    n = sample.size
    if (sample.inputs.dim() != 2 or sample.inputs.shape[0] != n or sample.outputs.shape != sample.inputs.shape
            or tuple(sample.probs.shape) != (n, num_experts) or n > capacity or n > sample.seen):
        return "tensors of inconsistent shapes"
    for name in FIELDS:
        if not bool(torch.isfinite(getattr(sample, name)).all()):
            return f"{name} holds NaN or infinite values"
    if n and (bool((sample.probs < 0).any()) or bool((sample.probs > 1).any())
              or float((sample.probs.double().sum(dim=1) - 1).abs().max()) > PROB_TOLERANCE):
        return "probs are not probabilities (each row a softmax: values in [0, 1] adding up to 1)"
    if n and (bool((sample.keys < 0).any()) or bool((sample.keys >= 1).any())
              or bool((sample.keys[1:] < sample.keys[:-1]).any())):
        return "keys are not ascending numbers in [0, 1)"
    return None


def run_digest(layers: Mapping[str, LayerSample]) -> str:
    """What one run recorded of one pair (every layer's tokens seen and sampled), to spot a run given twice."""
    digest = hashlib.sha256()
    for prefix in sorted(layers):
        sample = layers[prefix]
        digest.update(f"{prefix}:{sample.seen}:".encode())
        for name in FIELDS:
            digest.update(getattr(sample, name).contiguous().numpy().tobytes())
    return digest.hexdigest()


def merge(calibrations: Iterable[Calibration]) -> Calibration:
    """Runs over the same model and settings, merged per (pair, layer) by their smallest keys."""
    calibrations = list(calibrations)
    if not calibrations:
        raise CalibrationError("nothing to merge")
    first = calibrations[0]
    merged = Calibration(first.fingerprint, dict(first.settings), {})
    for calibration in calibrations:
        if calibration.fingerprint != first.fingerprint:
            raise CalibrationError("calibration files come from different models (MoE layers, gate or expert weights "
                                   "differ)")
        if calibration.settings != first.settings:
            differing = sorted(k for k in set(first.settings) | set(calibration.settings)
                               if first.settings.get(k) != calibration.settings.get(k))
            raise CalibrationError(f"calibration files were gathered with different settings: {', '.join(differing)}")
        for pair, layers in calibration.pairs.items():
            target = merged.pairs.setdefault(pair, {})
            for prefix, sample in layers.items():
                target[prefix] = target[prefix].merged(sample, merged.capacity) if prefix in target else sample
    return merged


def load(path: str) -> Calibration:
    """A calibration file, or every ``*.safetensors`` file of a folder, merged."""
    if os.path.isdir(path):
        names = regular_files(path, FILE_SUFFIX)  # a FIFO among them would block the reader forever
        if not names:
            raise CalibrationError(f"{path}: no calibration files (*{FILE_SUFFIX}) in this folder")
        loaded = [load_file(os.path.join(path, name)) for name in names]
        seen: Dict[Tuple[str, str], str] = {}  # (pair, run digest) -> the file holding it
        for name, calibration in zip(names, loaded):
            for pair, layers in calibration.pairs.items():
                key = (pair, run_digest(layers))
                if key in seen and any(sample.seen for sample in layers.values()):
                    raise CalibrationError(f"{path}: {name} and {seen[key]} both hold the same samples of {pair} "
                                           "(one run twice); merging it twice would count its tokens twice")
                seen[key] = name
        return merge(loaded)
    if os.path.exists(path) and not is_regular_file(path):
        raise CalibrationError(f"{path}: not a regular file (calibration samples are a file or a folder of files)")
    return load_file(path)


# The most tokens one layer is judged on for one output. A view pooling more (NLLB-200's 200 directions at
# 2,048 tokens each are 409,600 tokens per layer) is reduced to this many by :func:`pool`'s weighted reservoir.
# The search holds tokens x experts^2 float64 inner products and four tokens x experts tables, so at NLLB's
# size (128 experts) this bound is 32,768 x 128 x (128 + 4) x 8 B = 4.1 GiB of search data per layer (409,600
# tokens would be 52 GiB), plus the pooled samples, 32,768 x (2 x 2,048 + 128) x 4 B = 0.5 GiB, and one chunk of
# expert outputs while they are evaluated (reconstruction.CHUNK_BYTES: 0.3 GiB).
POOL_TOKENS = 32768


@dataclass
class Pool:
    """The tokens one layer is judged on: samples of several pairs, each token weighing seen/kept, or (when
    the view had more than its bound) a weighted reservoir of them, with its weights (see :func:`pool`)."""

    inputs: Tensor
    probs: Tensor
    outputs: Tensor
    weights: Tensor  # (n,) float64: tokens of the runs each sampled token stands for

    @property
    def size(self) -> int:
        return int(self.weights.shape[0])


def check_pool_tokens(limit: int) -> None:
    if not isinstance(limit, int) or isinstance(limit, bool) or limit < 1:
        raise CalibrationError(f"--calibration-pool-tokens must be a whole number of at least 1, got {limit!r}")


def pool_priorities(sample: LayerSample, weight: float) -> Tensor:
    """Priority-sampling keys of a sample's tokens: weight / u, u uniform in (0, 1] from a stream seeded by the
    sample's own reservoir keys, so the same samples always give the same priorities."""
    digest = hashlib.sha256(sample.keys.contiguous().numpy().tobytes()).digest()
    generator = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))
    uniform = 1.0 - torch.rand(sample.size, generator=generator, dtype=torch.float64)
    return weight / uniform


def pool(samples: List[LayerSample], limit: int = POOL_TOKENS) -> Pool:
    """The tokens of ``samples`` together, in order, each weighing ``seen / kept`` of its sample.

    More than ``limit`` tokens are reduced to ``limit`` by priority sampling (Duffield, Lund and Thorup,
    2007), a weighted reservoir: token i of weight w_i gets the priority q_i = w_i / u_i, the ``limit``
    highest priorities are kept (in their pooled order) and each takes the weight max(w_i, tau), tau the
    highest priority left out, which estimates any weighted sum over the view without bias; the kept
    weights are then scaled so that they add up to the view's tokens seen exactly. Only the kept rows are
    gathered: memory is bounded by ``limit``, not by the view.
    """
    check_pool_tokens(limit)
    samples = [s for s in samples if s.size > 0]
    if not samples:
        return Pool(torch.zeros(0, 0), torch.zeros(0, 0), torch.zeros(0, 0), torch.zeros(0, dtype=torch.float64))
    weights = [torch.full((s.size,), s.seen / s.size, dtype=torch.float64) for s in samples]
    if sum(s.size for s in samples) <= limit:
        return Pool(torch.cat([s.inputs for s in samples]), torch.cat([s.probs for s in samples]),
                    torch.cat([s.outputs for s in samples]), torch.cat(weights))
    priorities = torch.cat([pool_priorities(s, s.seen / s.size) for s in samples])
    ranked = torch.argsort(-priorities, stable=True)
    kept = torch.sort(ranked[:limit]).values
    threshold = priorities[ranked[limit]]
    all_weights = torch.cat(weights)
    kept_weights = torch.maximum(all_weights[kept], threshold)
    kept_weights = kept_weights * (all_weights.sum() / kept_weights.sum())
    rows: Dict[str, List[Tensor]] = {"inputs": [], "probs": [], "outputs": []}
    start = 0
    for sample in samples:
        end = start + sample.size
        local = kept[(kept >= start) & (kept < end)] - start
        for name, parts in rows.items():
            parts.append(getattr(sample, name).index_select(0, local))
        start = end
    return Pool(torch.cat(rows["inputs"]), torch.cat(rows["probs"]), torch.cat(rows["outputs"]), kept_weights)


def view(calibration: Calibration, granularity: str, name: str, prefix: str,
         limit: int = POOL_TOKENS) -> Tuple[Pool, str]:
    """The tokens layer ``prefix`` is judged on for output ``name`` (at most ``limit``: :func:`pool`), and what
    they are (for messages).

    global: all pairs; pair: the pair ``name``; language (``name`` a direction or a language): encoder
    layers from the pairs with that source language, decoder layers from those with that target.
    """
    if granularity == "global":
        pairs = sorted(calibration.pairs)
        what = "any pair"
    elif granularity == "pair":
        pairs = [name] if name in calibration.pairs else []
        what = f"pair {name}"
    else:
        if "-" in name:
            source, target = split_pair(name)
        else:
            source = target = name
        encoder = MoELayerSpec.from_prefix(prefix, 0).side == "encoder"
        language = source if encoder else target
        pairs = [p for p in sorted(calibration.pairs) if split_pair(p)[0 if encoder else 1] == language]
        what = f"{language} as a {'source' if encoder else 'target'}"
    return pool([calibration.pairs[p][prefix] for p in pairs if prefix in calibration.pairs[p]], limit), what


class CalibrationWriter(WrittenAtExit):
    """Writes the sampler's committed samples to ``{folder}/{pair}.seed-{seed}.safetensors``: empty at the
    start, then when the process ends (SIGTERM included) or the recording closes.

    One file per run: runs over shards of a direction (each with its own ``--seed``, as their keys must be
    independent) leave files side by side that ``--calibration FOLDER`` merges. A second run with the same
    direction and seed into the same folder is refused (it would replace the first run's file, or hold the
    same tokens twice): the name is claimed with an exclusive create, so two runs started together cannot
    both take it."""

    option = "--moe-calibration-out"
    claimed: Set[str] = set()  # files this process claimed (a task that builds a second generator reopens one)

    def __init__(self, sampler: CalibrationSampler, folder: str, pair: str):
        self.sampler = sampler
        self.path = os.path.join(folder, run_file_name(pair, sampler.seed))
        if os.path.exists(folder) and not os.path.isdir(folder):
            raise CalibrationError(f"--moe-calibration-out {folder} is a file; name a folder for the samples")
        if os.path.abspath(self.path) not in CalibrationWriter.claimed:
            self.claim(folder, pair)
        try:
            self.open()
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                if os.path.getsize(self.path) == 0:  # still the claim: nothing was written
                    os.unlink(self.path)
            raise

    def claim(self, folder: str, pair: str) -> None:
        """Create the file exclusively (empty until :meth:`open` writes it)."""
        try:
            make_folder(folder)
            claim = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        except FileExistsError:
            raise CalibrationError(f"--moe-calibration-out: {self.path} exists (a run of {pair} with --seed "
                                   f"{self.sampler.seed}); give another shard of the direction another --seed, or "
                                   "remove the file to record again") from None
        except OSError as error:
            raise CalibrationError(f"--moe-calibration-out {folder}: {error.strerror or error}") from None
        os.close(claim)
        CalibrationWriter.claimed.add(os.path.abspath(self.path))

    def write(self) -> None:
        save(self.sampler.snapshot(), self.path)


def run_file_name(pair: str, seed: int) -> str:
    """``eng_Latn-deu_Latn.seed-1.safetensors``; the pair is checked by stats.split_pair, as every pair read
    from a file."""
    split_pair(pair)
    return f"{pair}.seed-{int(seed)}{FILE_SUFFIX}"


def attach(recorder: Any, folder: str, tokens: int, seed: int, pair: str) -> CalibrationWriter:
    """The recording hook's call: sample the tokens ``recorder`` counts into ``folder``."""
    if tokens < 1:
        raise SystemExit(f"error: --moe-calibration-tokens must be at least 1, got {tokens}")
    settings = dict(recorder.settings, tokens=int(tokens), outputs=TARGET_OUTPUTS)
    sampler = CalibrationSampler(recorder.specs, recorder.fingerprint, settings, seed, recorder.no_drop_output)
    recorder.calibration = sampler
    return CalibrationWriter(sampler, folder, pair)
