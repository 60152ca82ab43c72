#!/usr/bin/env python3
"""Build a multilingual MT data set from Debian's LibreOffice help packages.

The LibreOffice help is shipped as HTML, one package per language
(``libreoffice-help-<suffix>``). Every language has the same file tree and the
same paragraph ids, so (file, id) aligns a translated paragraph with its
English original exactly. This script turns that into fairseq binaries for the
``translation_multi_simple_epoch`` task (English-centric, both directions).

Stages (each one skips work whose outputs already exist, unless ``--force``):

  fetch     apt-get download + dpkg-deb -x the packages   -> OUT/debs, OUT/extracted
  align     parse HTML, align with English, clean           -> OUT/aligned/eng_Latn-X.tsv
  split     train/valid/test split by English source string  -> OUT/raw/
  spm       one SentencePiece model for all languages        -> OUT/spm.model, OUT/spm/
  binarize  one joined fairseq dictionary, fairseq-preprocess -> OUT/bin/
  sample    (not run by default) small deterministic TSV sample for the test suite

Examples:
  python examples/libreoffice_help/prepare_data.py --langs deu_Latn,fra_Latn --out /tmp/lohelp
  python examples/libreoffice_help/prepare_data.py \\
      --aligned-dir tests/data/libreoffice_help --out /tmp/lohelp_small --vocab-size 2000

Raw (untokenized) test files stay in OUT/raw/ so BLEU can be computed against
detokenized references after decoding with OUT/spm.model.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable
from concurrent.futures import ProcessPoolExecutor
from html.parser import HTMLParser
from pathlib import Path

from fairseq_moe_prune.files import atomic_open

ENGLISH = "eng_Latn"

# NLLB / FLORES-200 code -> Debian package suffix (libreoffice-help-<suffix>).
# All suffixes were checked with `apt-cache policy` on Debian 12 (bookworm),
# LibreOffice 7.4. por_Latn maps to Brazilian Portuguese (as in FLORES-200);
# European Portuguese (`pt`) has no separate NLLB code. Oromo is `gaz_Latn` in NLLB.
DEBIAN_SUFFIX: dict[str, str] = {
    "eng_Latn": "en-us",
    "deu_Latn": "de",
    "fra_Latn": "fr",
    "spa_Latn": "es",
    "ita_Latn": "it",
    "por_Latn": "pt-br",
    "nld_Latn": "nl",
    "swe_Latn": "sv",
    "dan_Latn": "da",
    "cat_Latn": "ca",
    "glg_Latn": "gl",
    "pol_Latn": "pl",
    "ces_Latn": "cs",
    "slk_Latn": "sk",
    "slv_Latn": "sl",
    "rus_Cyrl": "ru",
    "ell_Grek": "el",
    "fin_Latn": "fi",
    "est_Latn": "et",
    "hun_Latn": "hu",
    "tur_Latn": "tr",
    "eus_Latn": "eu",
    "ind_Latn": "id",
    "vie_Latn": "vi",
    "hin_Deva": "hi",
    "khm_Khmr": "km",
    "dzo_Tibt": "dz",
    "gaz_Latn": "om",
    "jpn_Jpan": "ja",
    "kor_Hang": "ko",
    "zho_Hans": "zh-cn",
    "zho_Hant": "zh-tw",
}

ALL_STAGES = ("fetch", "align", "split", "spm", "binarize")
EXTRA_STAGES = ("sample",)
SPLITS = ("train", "valid", "test")

# Element ids that carry translatable text. bm_id* are mostly empty <a name>
# anchors, but a few <p id="bm_id..."> hold text; FilterName_/APIName_/... ids
# mark untranslated technical table cells and are left out on purpose.
PARAGRAPH_ID = re.compile(r"^(par_|hd_|bm_id|N\d)")
VOID_TAGS = frozenset(
    "area base br col embed hr img input link meta param source track wbr".split()
)
# Tags whose boundaries separate words even when the HTML has no white space.
BREAK_TAGS = frozenset("br p div li td th tr h1 h2 h3 h4 h5 h6 pre table".split())


def log(msg: str) -> None:
    """Progress goes to stderr so stdout stays clean for piping."""
    print(f"[prepare_data] {msg}", file=sys.stderr, flush=True)


def die(msg: str) -> SystemExit:
    """A one-line error without a traceback (raise the returned value)."""
    return SystemExit(f"error: {msg}")


def sha_unit(text: str, salt: str = "") -> float:
    """Map a string to [0, 1) reproducibly across runs, machines and Python versions."""
    digest = hashlib.sha256((salt + text).encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def atomic_write_lines(path: Path, lines: Iterable[str]) -> None:
    """Write atomically (files.atomic_open) so an interrupted run never leaves a half file
    that a later (idempotent) run would mistake for a finished one."""
    with atomic_open(str(path), "w") as f:
        for line in lines:
            f.write(line + "\n")


def read_lines(path: Path) -> list[str]:
    """Read a UTF-8 text file as lines, splitting on "\n" only: str.splitlines() would also
    split on U+2028, \x85, \x0c..., silently misaligning parallel files."""
    with open(path, encoding="utf-8", newline="\n") as f:
        text = f.read()
    lines = text.split("\n")
    return lines[:-1] if lines[-1] == "" else lines


def pair_name(lang: str) -> str:
    """English-centric pair name used in every file name (eng_Latn-X)."""
    return f"{ENGLISH}-{lang}"


def run_cmd(cmd: list[str], **kwargs) -> subprocess.CompletedProcess:
    """Run a command, turning a failure into a one-line error with its last stderr line."""
    proc = subprocess.run(cmd, capture_output=True, text=True, **kwargs)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["(no output)"]
        raise die(f"{' '.join(cmd[:3])} ... failed (exit {proc.returncode}): {tail[0]}")
    return proc


# --------------------------------------------------------------------- fetch


def package_name(lang: str) -> str:
    """Debian package that holds the help for an NLLB language code."""
    return f"libreoffice-help-{DEBIAN_SUFFIX[lang]}"


def apt_lists_empty() -> bool:
    """True when `apt-get update` has never run (no Packages indexes on disk)."""
    lists = Path("/var/lib/apt/lists")
    return not any(lists.glob("*_Packages*"))


def download_deb(pkg: str, debs: Path) -> Path:
    """apt-get download one package into the cache dir (run apt-get update at most once,
    and only when the package lists are missing)."""
    existing = sorted(debs.glob(f"{pkg}_*.deb"))
    if existing:
        return existing[-1]
    debs.mkdir(parents=True, exist_ok=True)
    # Sandbox user root: avoids the "_apt cannot access" warning in a root-owned dir.
    cmd = ["apt-get", "download", "-q", "-o", "APT::Sandbox::User=root", pkg]
    proc = subprocess.run(cmd, cwd=debs, capture_output=True, text=True)
    if proc.returncode != 0 and apt_lists_empty():
        log("apt lists are empty; running apt-get update once")
        subprocess.run(["apt-get", "update", "-q"], capture_output=True, text=True)
        proc = subprocess.run(cmd, cwd=debs, capture_output=True, text=True)
    found = sorted(debs.glob(f"{pkg}_*.deb"))
    if proc.returncode != 0 or not found:
        reason = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no .deb produced"]
        raise die(f"cannot fetch {pkg}: {reason[0]}")
    return found[-1]


def extract_deb(deb: Path, dest: Path) -> None:
    """dpkg-deb -x into a temp dir then rename, so a half extraction is never reused."""
    if dest.is_dir():
        return
    tmp = dest.with_name(dest.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    run_cmd(["dpkg-deb", "-x", str(deb), str(tmp)])
    os.replace(tmp, dest)


def stage_fetch(langs: list[str], out: Path, force: bool) -> None:
    """Download and unpack English plus every requested language."""
    for lang in [ENGLISH, *langs]:
        pkg = package_name(lang)
        dest = out / "extracted" / pkg
        if force:
            shutil.rmtree(dest, ignore_errors=True)
            for deb in (out / "debs").glob(f"{pkg}_*.deb"):
                deb.unlink()
        if dest.is_dir():
            log(f"fetch: {pkg} already extracted")
            continue
        deb = download_deb(pkg, out / "debs")
        extract_deb(deb, dest)
        log(f"fetch: {pkg} <- {deb.name}")


# --------------------------------------------------------------------- align


class ParagraphParser(HTMLParser):
    """Collect the text of every element whose id looks like a help paragraph id.

    A class is needed because html.parser is callback based. Inside a paragraph,
    text in `hidden` elements is dropped unless the element id starts with
    "default": the help shows platform/application variants with JavaScript
    (e.g. MAC "Command" vs default "Ctrl"), and only the default one should stay.
    """

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)  # unescapes &amp; &nbsp; ... for us
        self.stack: list[tuple[str, str | None, bool]] = []  # (tag, captured id, hidden)
        self.hidden_depth = 0
        self.open: dict[str, tuple[int, list[str]]] = {}  # id -> (hidden depth at start, text)
        self.paragraphs: dict[str, str] = {}

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in BREAK_TAGS:
            self._add_text(" ")
        if tag in VOID_TAGS:
            return
        attributes = dict(attrs)
        elem_id = attributes.get("id") or ""
        hidden = "hidden" in attributes and not elem_id.startswith("default")
        captured = None
        if PARAGRAPH_ID.match(elem_id) and elem_id not in self.paragraphs and elem_id not in self.open:
            captured = elem_id
            self.open[elem_id] = (self.hidden_depth, [])
        self.stack.append((tag, captured, hidden))
        if hidden:
            self.hidden_depth += 1

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.handle_starttag(tag, attrs)
        if tag not in VOID_TAGS:
            self.handle_endtag(tag)

    def handle_endtag(self, tag: str) -> None:
        if tag in BREAK_TAGS:
            self._add_text(" ")
        if tag in VOID_TAGS or all(t != tag for t, _, _ in self.stack):
            return  # stray end tag: ignore rather than unwinding the whole stack
        while self.stack:
            open_tag, captured, hidden = self.stack.pop()
            if hidden:
                self.hidden_depth -= 1
            if captured is not None:
                self._finish(captured)
            if open_tag == tag:
                break

    def handle_data(self, data: str) -> None:
        self._add_text(data)

    def close(self) -> None:
        super().close()
        for elem_id in list(self.open):
            self._finish(elem_id)

    def _add_text(self, text: str) -> None:
        for depth, parts in self.open.values():
            if depth == self.hidden_depth:
                parts.append(text)

    def _finish(self, elem_id: str) -> None:
        _, parts = self.open.pop(elem_id)
        self.paragraphs[elem_id] = clean_text("".join(parts))


def clean_text(text: str) -> str:
    """Collapse all white space (incl. NBSP and newlines) to single spaces.
    Placeholders such as %PRODUCTNAME or $[officename] are kept verbatim."""
    return " ".join(text.split())


def help_root(extracted: Path) -> Path:
    """The per-language help dir (en-US, de, zh-CN, ...): its name differs from the
    Debian suffix, so find it instead of guessing."""
    base = extracted / "usr/share/libreoffice/help"
    dirs = [d for d in sorted(base.iterdir()) if d.is_dir() and d.name != "media"] if base.is_dir() else []
    if len(dirs) != 1:
        raise die(f"expected one language dir under {base}, found {[d.name for d in dirs]}")
    return dirs[0]


def parse_help_tree(root: Path) -> dict[tuple[str, str], str]:
    """Map (relative html path, element id) -> cleaned paragraph text for one language."""
    paragraphs: dict[tuple[str, str], str] = {}
    for path in sorted(root.rglob("*.html")):
        parser = ParagraphParser()
        parser.feed(path.read_text(encoding="utf-8", errors="replace"))
        parser.close()
        rel = path.relative_to(root).as_posix()
        for elem_id, text in parser.paragraphs.items():
            paragraphs[(rel, elem_id)] = text
    return paragraphs


def word_count(text: str) -> int:
    """White-space word count (only used on the English side; CJK has no spaces)."""
    return len(text.split())


def align_pairs(
    english: dict[tuple[str, str], str],
    target: dict[tuple[str, str], str],
    max_words: int,
    max_chars: int,
) -> tuple[list[tuple[str, str]], dict[str, int]]:
    """Join two languages on (file, id), drop unusable pairs, and deduplicate."""
    stats = {"shared_keys": 0, "empty": 0, "untranslated": 0, "too_long": 0}
    pairs: set[tuple[str, str]] = set()
    for key in english.keys() & target.keys():
        stats["shared_keys"] += 1
        en, tgt = english[key], target[key]
        if not en or not tgt:
            stats["empty"] += 1
        elif en == tgt:
            stats["untranslated"] += 1
        elif word_count(en) > max_words or len(en) > max_chars or len(tgt) > max_chars:
            stats["too_long"] += 1
        else:
            pairs.add((en, tgt))
    kept = sorted(pairs)
    stats["kept_unique"] = len(kept)
    return kept, stats


def parse_language(out: Path, lang: str) -> dict[tuple[str, str], str]:
    """Parse one extracted package (module level so a process pool can run it)."""
    return parse_help_tree(help_root(out / "extracted" / package_name(lang)))


def stage_align(
    langs: list[str], out: Path, force: bool, max_words: int, max_chars: int, workers: int
) -> None:
    """Write OUT/aligned/eng_Latn-X.tsv (English TAB target, sorted) for each language.
    HTML parsing is pure Python (~10 s per language), so languages run in parallel."""
    todo = [l for l in langs if force or not (out / "aligned" / f"{pair_name(l)}.tsv").exists()]
    if not todo:
        log("align: all TSVs exist")
        return
    for lang in [ENGLISH, *todo]:  # fail early, before any parsing
        parse_root = out / "extracted" / package_name(lang)
        if not parse_root.is_dir():
            raise die(f"{parse_root} missing: run the fetch stage first")
    all_stats = {}
    with ProcessPoolExecutor(max_workers=max(1, workers)) as pool:
        parsed = pool.map(parse_language, [out] * (len(todo) + 1), [ENGLISH, *todo])
        english = next(parsed)  # results arrive in order; English first
        log(f"align: {len(english)} English paragraphs")
        for lang, target in zip(todo, parsed):
            pairs, stats = align_pairs(english, target, max_words, max_chars)
            atomic_write_lines(out / "aligned" / f"{pair_name(lang)}.tsv", (f"{e}\t{t}" for e, t in pairs))
            all_stats[lang] = stats
            log(f"align: {lang}: {stats}")
    stats_path = out / "aligned" / "stats.json"
    old = json.loads(stats_path.read_text()) if stats_path.exists() else {}
    atomic_write_lines(stats_path, [json.dumps({**old, **all_stats}, indent=1, sort_keys=True)])


def read_tsv(path: Path) -> list[tuple[str, str]]:
    """Read an aligned TSV written by the align stage (or the committed sample)."""
    pairs = []
    for n, line in enumerate(read_lines(path), 1):
        fields = line.split("\t")
        if len(fields) != 2:
            raise die(f"{path}:{n}: expected 2 tab-separated fields, got {len(fields)}")
        pairs.append((fields[0], fields[1]))
    return pairs


# --------------------------------------------------------------------- split


def assign_split(english: str, valid_frac: float, test_frac: float) -> str:
    """Bucket by a hash of the English string only, so one English string lands in the
    same split for every language (no test leakage through another language)."""
    u = sha_unit(english)
    if u < test_frac:
        return "test"
    if u < test_frac + valid_frac:
        return "valid"
    return "train"


def hash_order(pairs: Iterable[tuple[str, str]]) -> list[tuple[str, str]]:
    """Order pairs by English hash (then text), so caps pick the same English strings
    in every language and the held-out sets stay multi-way parallel."""
    return sorted(pairs, key=lambda p: (sha_unit(p[0]), p[0], p[1]))


def split_pairs(
    pairs: list[tuple[str, str]],
    valid_frac: float,
    test_frac: float,
    valid_max: int,
    test_max: int,
    max_train: int,
) -> dict[str, list[tuple[str, str]]]:
    """Split one language's pairs; pairs over a valid/test cap are dropped, never moved
    to train, because their English string is held out in other languages."""
    buckets: dict[str, list[tuple[str, str]]] = {s: [] for s in SPLITS}
    for pair in hash_order(pairs):
        buckets[assign_split(pair[0], valid_frac, test_frac)].append(pair)
    caps = {"train": max_train, "valid": valid_max, "test": test_max}
    return {s: buckets[s][: caps[s]] if caps[s] > 0 else buckets[s] for s in SPLITS}


def raw_path(out: Path, split: str, lang: str, side: str) -> Path:
    """OUT/raw/{split}.eng_Latn-X.{side}"""
    return out / "raw" / f"{split}.{pair_name(lang)}.{side}"


def stage_split(langs: list[str], out: Path, aligned: Path, args: argparse.Namespace) -> None:
    """Write raw parallel text files for train/valid/test of every language."""
    for lang in langs:
        outputs = [raw_path(out, s, lang, side) for s in SPLITS for side in (ENGLISH, lang)]
        if not args.force and all(p.exists() for p in outputs):
            log(f"split: {lang} already split")
            continue
        tsv = aligned / f"{pair_name(lang)}.tsv"
        if not tsv.exists():
            raise die(f"{tsv} missing: run the align stage or pass --aligned-dir")
        parts = split_pairs(
            read_tsv(tsv), args.valid_frac, args.test_frac, args.valid_max, args.test_max, args.max_train
        )
        for split, split_pairs_ in parts.items():
            atomic_write_lines(raw_path(out, split, lang, ENGLISH), (e for e, _ in split_pairs_))
            atomic_write_lines(raw_path(out, split, lang, lang), (t for _, t in split_pairs_))
        log(f"split: {lang}: { {s: len(p) for s, p in parts.items()} }")


# ----------------------------------------------------------------------- spm


def spm_input_lines(out: Path, langs: list[str]) -> list[str]:
    """Training text for SentencePiece: each English string once (it repeats in every
    pair file) plus every target side. Languages are sorted because line order changes
    the float sums of EM training, so --langs order must not change the model."""
    english: set[str] = set()
    lines: list[str] = []
    for lang in sorted(langs):
        english.update(read_lines(raw_path(out, "train", lang, ENGLISH)))
        lines.extend(read_lines(raw_path(out, "train", lang, lang)))
    return sorted(english) + lines


def encoded_path(out: Path, split: str, lang: str, side: str) -> Path:
    """OUT/spm/{split}.eng_Latn-X.{side} (space-separated pieces)."""
    return out / "spm" / f"{split}.{pair_name(lang)}.{side}"


def stage_spm(langs: list[str], out: Path, args: argparse.Namespace) -> None:
    """Train one shared SentencePiece model, then encode every raw file with it."""
    import sentencepiece as spm  # imported late: fetch/align must work without it

    model = out / "spm.model"
    if args.force or not model.exists():
        with tempfile.TemporaryDirectory(dir=out) as tmp, contextlib.chdir(tmp):
            # Relative paths: the model stores its trainer options (input, model_prefix),
            # so absolute temp paths would make every spm.model byte-different.
            atomic_write_lines(Path("spm_train.txt"), spm_input_lines(out, langs))
            if hasattr(spm, "set_random_generator_seed"):
                spm.set_random_generator_seed(args.seed)
            spm.SentencePieceTrainer.train(
                input="spm_train.txt",
                model_prefix="spm",
                model_type=args.spm_type,
                vocab_size=args.vocab_size,
                character_coverage=0.9995,  # CJK scripts have thousands of characters
                byte_fallback=True,  # rare characters become bytes instead of <unk>
                input_sentence_size=args.spm_sentences,
                shuffle_input_sentence=True,
                hard_vocab_limit=False,  # tiny samples may not support the full vocab
                num_threads=args.num_threads,
                minloglevel=2,
            )
            for ext in ("model", "vocab"):
                os.replace(f"spm.{ext}", out / f"spm.{ext}")
        log(f"spm: trained {model} (vocab {args.vocab_size}, {args.spm_type})")
    else:
        log("spm: model exists")
    sp = spm.SentencePieceProcessor(model_file=str(model))
    for lang in langs:
        for split in SPLITS:
            for side in (ENGLISH, lang):
                dest = encoded_path(out, split, lang, side)
                if dest.exists() and not args.force:
                    continue
                lines = read_lines(raw_path(out, split, lang, side))
                pieces = sp.encode(lines, out_type=str) if lines else []
                atomic_write_lines(dest, (" ".join(p) for p in pieces))
    log(f"spm: encoded files in {out / 'spm'}")


# ------------------------------------------------------------------ binarize


def fairseq_preprocess(args_: list[str]) -> None:
    """Run fairseq-preprocess in this process: importing fairseq once, not once per pair, saves
    about 6 s per call. Its log handler is removed again so later calls do not log twice."""
    # start-up speed: fairseq (seconds) loads only when binarising; fetch and align run without it
    import logging

    from fairseq import options
    from fairseq_cli import preprocess

    root = logging.getLogger()
    handlers = list(root.handlers)
    try:
        preprocess.main(options.get_preprocessing_parser().parse_args(args_))
    except (OSError, AssertionError) as error:
        raise die(f"fairseq-preprocess {' '.join(args_[:4])} ...: {error}")
    finally:
        for handler in [h for h in root.handlers if h not in handlers]:
            root.removeHandler(handler)
            handler.close()


def build_joined_dict(out: Path, langs: list[str], workers: int) -> Path:
    """One dictionary for all languages: fairseq-preprocess --only-source --dict-only on
    the concatenation of every encoded training file (both sides)."""
    bin_dir = out / "bin"
    dict_path = bin_dir / "dict.txt"
    with tempfile.TemporaryDirectory(dir=out) as tmp:
        corpus = Path(tmp) / "all"
        lines: list[str] = []
        for lang in sorted(langs):  # --langs order must not change the dictionary
            for side in (ENGLISH, lang):
                lines.extend(read_lines(encoded_path(out, "train", lang, side)))
        # "--source-lang txt" makes fairseq read all.txt and write dict.txt.txt.
        atomic_write_lines(corpus.with_suffix(".txt"), lines)
        fairseq_preprocess(
            [
                "--only-source", "--dict-only",
                "--source-lang", "txt",
                "--trainpref", str(corpus),
                "--destdir", tmp,
                "--workers", str(workers),
            ]
        )
        bin_dir.mkdir(parents=True, exist_ok=True)
        os.replace(Path(tmp) / "dict.txt.txt", dict_path)
    return dict_path


def binarized(out: Path, lang: str) -> bool:
    """True when every split of the pair eng_Latn-X has been binarized."""
    return all(
        (out / "bin" / f"{s}.{pair_name(lang)}.{side}.idx").exists() for s in SPLITS for side in (ENGLISH, lang)
    )


def stage_binarize(langs: list[str], out: Path, args: argparse.Namespace) -> None:
    """Binarize every pair eng_Latn-X once with the shared dictionary. fairseq's translation
    tasks read the files of eng_Latn-X for the direction X->eng_Latn too, so both directions
    are served without a second copy."""
    bin_dir = out / "bin"
    dict_path = bin_dir / "dict.txt"
    if args.force or not dict_path.exists():
        dict_path = build_joined_dict(out, langs, args.workers)
        log(f"binarize: dictionary {dict_path} ({len(read_lines(dict_path))} entries)")
    for lang in langs:
        if binarized(out, lang) and not args.force:
            continue
        prefix = out / "spm"
        pair = pair_name(lang)
        with tempfile.TemporaryDirectory(dir=out) as tmp:  # no half-written binaries in bin/
            fairseq_preprocess(
                [
                    "--source-lang", ENGLISH, "--target-lang", lang,
                    "--trainpref", str(prefix / f"train.{pair}"),
                    "--validpref", str(prefix / f"valid.{pair}"),
                    "--testpref", str(prefix / f"test.{pair}"),
                    "--destdir", tmp,
                    "--srcdict", str(dict_path), "--tgtdict", str(dict_path),
                    "--workers", str(args.workers),
                ]
            )
            for name in sorted(os.listdir(tmp)):
                if name.endswith((".bin", ".idx")):
                    os.replace(Path(tmp) / name, bin_dir / name)
        log(f"binarize: {pair}")
    # translation_multi_simple_epoch loads dict.<lang>.txt for every language.
    for lang in [ENGLISH, *langs]:
        shutil.copyfile(dict_path, bin_dir / f"dict.{lang}.txt")
    atomic_write_lines(bin_dir / "langs.txt", [",".join([ENGLISH, *langs])])
    pairs = [f"{ENGLISH}-{l}" for l in langs] + [f"{l}-{ENGLISH}" for l in langs]
    atomic_write_lines(bin_dir / "lang_pairs.txt", [",".join(pairs)])


# -------------------------------------------------------------------- sample


def stage_sample(langs: list[str], aligned: Path, args: argparse.Namespace) -> None:
    """Write a small deterministic TSV sample per language for the test suite.

    Uses a *salted* hash: picking the smallest unsalted hashes would select exactly
    the strings that the split stage puts into test (u < test_frac), leaving no
    training data when the sample is split again.
    """
    if args.sample_dir is None:
        raise die("--sample-dir is required for the sample stage")
    for lang in langs:
        pairs = read_tsv(aligned / f"{pair_name(lang)}.tsv")
        wanted = [p for p in pairs if args.sample_min_words <= word_count(p[0]) <= args.sample_max_words]
        wanted.sort(key=lambda p: (sha_unit(p[0], salt="sample:"), p[0], p[1]))
        chosen = sorted(wanted[: args.sample_size])
        dest = args.sample_dir / f"{pair_name(lang)}.tsv"
        atomic_write_lines(dest, (f"{e}\t{t}" for e, t in chosen))
        log(f"sample: {dest} ({len(chosen)} pairs, {dest.stat().st_size} bytes)")


# ---------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command line; every size option has a default that fits the full data set."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--langs", help="comma-separated NLLB codes besides English "
                   f"(known: {','.join(sorted(set(DEBIAN_SUFFIX) - {ENGLISH}))}); "
                   "default with --aligned-dir: every eng_Latn-X.tsv found there")
    p.add_argument("--out", type=Path, required=True, help="output/work directory")
    p.add_argument("--stages", help=f"comma-separated subset of {','.join(ALL_STAGES + EXTRA_STAGES)} "
                   "(default: all of fetch..binarize, or split..binarize with --aligned-dir)")
    p.add_argument("--aligned-dir", type=Path, help="start from existing eng_Latn-X.tsv files here")
    p.add_argument("--force", action="store_true", help="redo stages even if outputs exist")
    p.add_argument("--max-words", type=int, default=100, help="drop pairs whose English has more words")
    p.add_argument("--max-chars", type=int, default=1000, help="drop pairs with a longer side (chars)")
    p.add_argument("--valid-frac", type=float, default=0.03, help="share of English strings for valid")
    p.add_argument("--test-frac", type=float, default=0.03, help="share of English strings for test")
    p.add_argument("--valid-max", type=int, default=1000, help="cap on valid pairs per language (0: none)")
    p.add_argument("--test-max", type=int, default=1000, help="cap on test pairs per language (0: none)")
    p.add_argument("--max-train", type=int, default=0, help="cap on train pairs per language (0: none)")
    p.add_argument("--vocab-size", type=int, default=8000, help="SentencePiece vocabulary size")
    p.add_argument("--spm-type", choices=("unigram", "bpe"), default="unigram")
    p.add_argument("--spm-sentences", type=int, default=1_000_000, help="input_sentence_size cap")
    p.add_argument("--seed", type=int, default=1, help="SentencePiece random seed")
    p.add_argument("--num-threads", type=int, default=2, choices=(1, 2),
                   help="SentencePiece threads (the model differs between 1 and 2 threads, "
                   "but is reproducible for a fixed value)")
    p.add_argument("--workers", type=int, default=2, help="parallel HTML parsing and fairseq-preprocess --workers")
    p.add_argument("--sample-dir", type=Path, help="sample stage: where to write the TSVs")
    p.add_argument("--sample-size", type=int, default=1500, help="sample stage: pairs per language")
    p.add_argument("--sample-min-words", type=int, default=4)
    p.add_argument("--sample-max-words", type=int, default=25)
    return p.parse_args(argv)


def resolve_langs(args: argparse.Namespace) -> list[str]:
    """Validate --langs, or infer it from the TSVs in --aligned-dir."""
    if args.langs:
        langs = [l.strip() for l in args.langs.split(",") if l.strip()]
    elif args.aligned_dir is not None:
        prefix = f"{ENGLISH}-"
        langs = sorted(p.stem[len(prefix):] for p in args.aligned_dir.glob(f"{prefix}*.tsv"))
    else:
        raise die("--langs is required unless --aligned-dir is given")
    if not langs:
        raise die("no languages given or found")
    unknown = [l for l in langs if l not in DEBIAN_SUFFIX or l == ENGLISH]
    needs_debian = args.aligned_dir is None
    if unknown and needs_debian:
        raise die(f"unknown language code(s) {unknown}; known: {sorted(DEBIAN_SUFFIX)}")
    if len(set(langs)) != len(langs):
        raise die(f"duplicate language codes in {langs}")
    return langs


def main(argv: list[str] | None = None) -> None:
    """Run the requested stages in order and report how long each took."""
    args = parse_args(argv)
    langs = resolve_langs(args)
    default = ALL_STAGES[2:] if args.aligned_dir is not None else ALL_STAGES
    stages = [s.strip() for s in args.stages.split(",")] if args.stages else list(default)
    bad = [s for s in stages if s not in ALL_STAGES + EXTRA_STAGES]
    if bad:
        raise die(f"unknown stage(s) {bad}")
    if args.aligned_dir is not None and {"fetch", "align"} & set(stages):
        raise die("--aligned-dir replaces the fetch and align stages; drop them from --stages")
    out: Path = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    aligned = args.aligned_dir.resolve() if args.aligned_dir is not None else out / "aligned"
    timings: dict[str, float] = {}
    for stage in ALL_STAGES + EXTRA_STAGES:
        if stage not in stages:
            continue
        start = time.monotonic()
        if stage == "fetch":
            stage_fetch(langs, out, args.force)
        elif stage == "align":
            stage_align(langs, out, args.force, args.max_words, args.max_chars, args.workers)
        elif stage == "split":
            stage_split(langs, out, aligned, args)
        elif stage == "spm":
            stage_spm(langs, out, args)
        elif stage == "binarize":
            stage_binarize(langs, out, args)
        elif stage == "sample":
            stage_sample(langs, aligned, args)
        timings[stage] = round(time.monotonic() - start, 1)
        log(f"{stage}: done in {timings[stage]} s")
    log(f"timings (s): {timings}")


if __name__ == "__main__":
    main()
