"""Install llama.cpp's own HF -> GGUF converters next to the installed llama-cpp-python.

The llama-cpp-python wheel carries the llama.cpp library (tokenizer, quantizer, inference) but
not `convert_hf_to_gguf.py` (a model) nor `convert_lora_to_gguf.py` (a LoRA adapter). Its source
distribution on PyPI has both, in vendor/llama.cpp, with the `conversion/` package and the
`gguf-py` they import. Taking them from the sdist of the very version that is installed means
the converters write exactly the GGUF that this library reads.

Run once after installing the `export` extra (the Makefile does):

    python -m tools.export_setup            # pip download of the matching sdist, then extract
    python -m tools.export_setup --sdist F  # extract from an sdist already on disk

Nothing is downloaded when an export runs; `tools.export_gguf.find_converter` only looks here
(or at $LLAMA_CPP_CONVERTER, a convert_hf_to_gguf.py in a llama.cpp checkout).
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

DIST = "llama-cpp-python"
# What convert_hf_to_gguf.py needs from its source tree (it imports `conversion` from its own
# folder and puts its own gguf-py first on sys.path).
# convert_lora_to_gguf.py (a PEFT LoRA adapter -> a GGUF adapter) reuses the same conversion/.
SCRIPTS = ("convert_hf_to_gguf.py", "convert_lora_to_gguf.py")
_MEMBERS = (*SCRIPTS, "conversion/", "gguf-py/gguf/", "LICENSE")


def converter_home() -> Path:
    """Where the converter is installed: inside the environment, beside its llama-cpp-python."""
    return Path(sys.prefix) / "share" / "llama-cpp-converter"


def converter_path() -> Path:
    """convert_hf_to_gguf.py: $LLAMA_CPP_CONVERTER (a llama.cpp checkout's), else ours."""
    env = os.environ.get("LLAMA_CPP_CONVERTER")
    return Path(env) if env else converter_home() / "convert_hf_to_gguf.py"


INSTALL_COMMAND = "pip install -e '.[export]' && python -m tools.export_setup"


def export_missing() -> str | None:
    """Why export_model cannot write GGUF here (None: it can): llama-cpp-python or the converter
    taken from its sdist is missing. Checked without importing either."""
    import importlib.util
    if importlib.util.find_spec("llama_cpp") is None:
        return (f"the export extra (llama-cpp-python) is not installed; install it with `{INSTALL_COMMAND}` "
                "(or `make venv`, without EXPORT=0).")
    script = converter_path()
    if not script.is_file():
        return f"llama.cpp's converter is not installed ({script}); install it with `python -m tools.export_setup`."
    return None


def installed_version() -> str | None:
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version(DIST)
    except PackageNotFoundError:
        return None


def _download_sdist(ver: str, into: Path) -> Path:
    # --no-binary makes pip fetch the source archive (the one pip built the wheel from; usually
    # still in pip's cache, so this costs no second download).
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary",
                    ":all:", "-d", str(into), f"{DIST}=={ver}"], check=True)
    found = sorted(into.glob("llama_cpp_python-*.tar.gz"))
    if not found:
        raise SystemExit(f"pip download of {DIST}=={ver} produced no sdist in {into}")
    return found[0]


def _extract(sdist: Path, dest: Path) -> int:
    """Copy the converter's files out of the sdist's vendor/llama.cpp into dest; return count."""
    n = 0
    with tarfile.open(sdist) as tar:
        for m in tar.getmembers():
            parts = Path(m.name).parts
            if len(parts) < 4 or parts[1:3] != ("vendor", "llama.cpp") or not m.isfile():
                continue
            rel = "/".join(parts[3:])
            if not any(rel == p or (p.endswith("/") and rel.startswith(p)) for p in _MEMBERS):
                continue
            target = dest / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            with tar.extractfile(m) as src, open(target, "wb") as out:
                shutil.copyfileobj(src, out)
            n += 1
    return n


def install(sdist: Path | None = None, force: bool = False) -> Path:
    """Extract the converter matching the installed llama-cpp-python; return the script path."""
    ver = installed_version()
    if ver is None:
        raise SystemExit(f"{DIST} is not installed: pip install -e '.[export]' first.")
    home = converter_home()
    stamp = home / "VERSION"
    if not force and stamp.is_file() and stamp.read_text().strip() == ver \
            and all((home / f).is_file() for f in SCRIPTS):
        return home / "convert_hf_to_gguf.py"
    with tempfile.TemporaryDirectory() as tmp:
        src = sdist or _download_sdist(ver, Path(tmp))
        if f"-{ver}.tar" not in src.name:
            raise SystemExit(f"{src.name} is not the sdist of the installed {DIST} {ver}: the "
                             "converter must come from the same llama.cpp as the library.")
        staged = Path(tmp) / "staged"
        count = _extract(src, staged)
        if not all((staged / f).is_file() for f in SCRIPTS) or not (staged / "conversion").is_dir():
            raise SystemExit(f"{src} has no vendor/llama.cpp/{' + '.join(SCRIPTS)} + conversion/")
        (staged / "VERSION").write_text(ver + "\n")
        # Replace the old copy in one rename, so a failed run never leaves half a converter.
        old = home.with_name(home.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        home.parent.mkdir(parents=True, exist_ok=True)
        if home.exists():
            home.rename(old)
        shutil.move(str(staged), str(home))
        shutil.rmtree(old, ignore_errors=True)
    print(f"llama.cpp converter {ver}: {count} files in {home}", file=sys.stderr)
    return home / "convert_hf_to_gguf.py"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sdist", type=Path, help="a llama_cpp_python-<version>.tar.gz already on disk")
    ap.add_argument("--force", action="store_true", help="extract again even if up to date")
    args = ap.parse_args(argv)
    print(install(args.sdist, args.force))


if __name__ == "__main__":
    main()
