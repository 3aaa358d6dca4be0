"""What a checkpoint root holds: its `latest` iteration, its iteration directories, whether anything
was saved there yet, and `--save-retain` pruning of the old ones.

The trainer asks these before it trains (is `--load` still empty? would saving move `latest`
backwards?) and after each publish (which old directories may go). Only names are read here;
`format.resolve` and the reader decide whether a checkpoint is complete.
"""

from __future__ import annotations

import os
import re
import shutil
import warnings
from typing import Dict, List, Optional

from megaglot.checkpoint.format import CheckpointError

ITERATION_DIR = re.compile(r"^iter_(\d+)$")
STAGING_DIR = re.compile(r"^iter_(\d+)\.tmp$")


def latest_iteration(root: str) -> Optional[int]:
    """The iteration `root/latest` names; None when the root has no `latest` file."""
    path = os.path.join(root, "latest")
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        name = f.read().strip()
    match = ITERATION_DIR.match(name)
    if match is None:
        raise CheckpointError(f"{path}: names {name!r}, not an iter_NNNNNNN directory")
    return int(match.group(1))


def _dirs(root: str, pattern: re.Pattern) -> Dict[int, str]:
    """{iteration: path} of the directories in `root` whose names match `pattern`."""
    found = {}
    for name in os.listdir(root) if os.path.isdir(root) else ():
        match = pattern.match(name)
        if match is not None and os.path.isdir(os.path.join(root, name)):
            found[int(match.group(1))] = os.path.join(root, name)
    return found


def iteration_dirs(root: str) -> Dict[int, str]:
    """{iteration: path} of the published iteration directories (`iter_NNNNNNN`) in `root`."""
    return _dirs(root, ITERATION_DIR)


def nothing_saved_yet(path: str) -> bool:
    """True when `path` is missing, or a directory holding nothing but the staging directories
    (`iter_N.tmp`) a save killed before its first publish leaves: a run started with `--load path`
    then starts from scratch. Anything else there (a `latest`, a metadata.json, an iteration
    directory, a stray file), and any path named `iter_N` itself, is a checkpoint to load, or to
    fail on clearly."""
    if ITERATION_DIR.match(os.path.basename(os.path.normpath(path))):
        return False  # an iteration directory, missing or not: a wrong path or a broken checkpoint
    if not os.path.isdir(path):
        return not os.path.exists(path)
    return all(STAGING_DIR.match(name) and os.path.isdir(os.path.join(path, name)) for name in os.listdir(path))


def prune(root: str, keep: int) -> List[str]:
    """Delete the iteration directories of `root` older than its newest `keep` (the one `latest`
    names is the newest and always stays), and staging directories older than `latest` that killed
    saves left. Call after a publish. Directories newer than `latest` (published by a save killed
    before it moved `latest`) are left: the run overwrites them when it gets there. Each goes by a
    rename to its staging name first, so one killed mid-delete is never read as a checkpoint.
    Returns the names removed; a directory that cannot be removed is a warning, not a failure."""
    latest = latest_iteration(root)
    if latest is None:
        return []
    published = iteration_dirs(root)
    doomed = [path for it, path in sorted(_dirs(root, STAGING_DIR).items()) if it < latest]
    doomed += [published[it] for it in sorted(it for it in published if it <= latest)[:-keep]]
    removed = []
    for path in doomed:
        try:
            if not path.endswith(".tmp"):
                staged = path + ".tmp"
                shutil.rmtree(staged, ignore_errors=True)
                os.replace(path, staged)
                shutil.rmtree(staged)
            else:
                shutil.rmtree(path)
            removed.append(os.path.basename(path))
        except OSError as e:
            warnings.warn(f"--save-retain: could not remove {path} ({e}); remove it by hand")
    return removed
