"""Find a checkpoint's files and read every header: the on-disk catalogue, no tensor data.

Accepts a directory with ``model.safetensors.index.json`` and its shards, a directory with one
``*.safetensors`` file, or the path of one file. Shard names from an index are resolved only
inside the checkpoint directory. Every file is opened through :mod:`lazyfp8.storage.files`: regular
files only, so a FIFO or device where a file should be is an error, never a hang.

A path that names nothing local but has the Hub's ``org/name`` form is a Hugging Face Hub repo id:
:mod:`.hub` resolves it to a snapshot of huggingface_hub's cache (downloading, when allowed, only
the files read here), and the snapshot is read like any directory.

Which files a directory means follows transformers (``modeling_utils.
_get_resolved_checkpoint_files``): ``config.json``'s ``transformers_weights`` if set, else
``model.safetensors``, else the index; so a directory holding both ``model.safetensors`` and an
index is read as the single file, by transformers and by us alike (``inspect`` reports it).
"""

from __future__ import annotations

import dataclasses
import glob
import os
import re
import unicodedata
from typing import Any

from ..errors import (
    CheckpointError,
    CorruptCheckpointError,
    MissingShardError,
    RepoNotCachedError,
    UnsafePathError,
    raise_or_collect,
)
from .files import allowed_roots, check_name, inside, open_error, read_regular
from .header import ShardHeader, TensorEntry, parse_json, read_header
from .hub import HubRepo, HubSource, is_repo_id, open_repo

__all__ = ["Checkpoint", "INDEX_NAME", "SINGLE_NAME", "open_checkpoint"]

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
_SHARD_NAME = re.compile(r"-(\d+)-of-(\d+)\.safetensors$")
CONFIG_NAME = "config.json"
#: ModelOpt's own description of its quantization, beside (or instead of) config.json's.
QUANT_CONFIG_NAME = "hf_quant_config.json"
# The index of a model with a million tensors is about 60 MB; a larger JSON file is not one.
MAX_JSON_BYTES = 256 << 20


@dataclasses.dataclass(frozen=True)
class Checkpoint:
    """Every tensor of a checkpoint, located.

    Attributes:
        root: the checkpoint directory.
        shards: parsed headers by absolute file path, in index order.
        tensors: on-disk key -> (shard path, entry), in index order.
        config: the parsed ``config.json`` beside the shards, or ``None``.
        index_path: the index file, or ``None`` for a single-file checkpoint.
        quant_config: the parsed ``hf_quant_config.json`` (ModelOpt), or ``None``.
        hub: for a checkpoint opened by Hub repo id, the repo, revision, commit and cache it
            came from (``root`` is then the snapshot directory), else ``None``.
    """

    root: str
    shards: dict[str, ShardHeader]
    tensors: dict[str, tuple[str, TensorEntry]]
    config: dict[str, Any] | None
    index_path: str | None
    quant_config: dict[str, Any] | None = None
    hub: HubSource | None = None

    def locate(self, key: str) -> tuple[str, TensorEntry] | None:
        return self.tensors.get(key)


def _load_json(path: str, what: str) -> Any:
    try:
        raw = read_regular(path, what, MAX_JSON_BYTES + 1)
    except OSError as e:
        raise open_error(e, path, what) from e
    if len(raw) > MAX_JSON_BYTES:
        raise CorruptCheckpointError(f"{path}: {what} is larger than {MAX_JSON_BYTES} bytes", file=path)
    return parse_json(raw, path, what)


class _Folded:
    """The names in ``root`` by their case- and normalisation-folded form, listed on first use:
    what an index written on macOS or Windows may have meant (an error message hint only)."""

    def __init__(self, root: str):
        self.root = root
        self._by_fold: dict[str, list[str]] | None = None

    @staticmethod
    def fold(name: str) -> str:
        return unicodedata.normalize("NFC", name).casefold()

    def like(self, name: str) -> list[str]:
        if self._by_fold is None:
            self._by_fold = {}
            try:
                for f in os.listdir(self.root):
                    self._by_fold.setdefault(self.fold(f), []).append(f)
            except (OSError, ValueError):
                pass
        return [f for f in self._by_fold.get(self.fold(name), []) if f != name]


def _resolve_shard(root: str, name: Any, key: str, index_path: str, roots: list[str], folded: _Folded) -> str:
    if not isinstance(name, str) or not name:
        raise CorruptCheckpointError(
            f"{index_path}: weight_map entry for {key!r} must be a file name, found {name!r}",
            file=index_path,
            key=key,
        )
    check_name(name, f"shard of {key!r}", file=index_path, key=key)
    parts = name.replace("\\", "/").split("/")
    if os.path.isabs(name) or name.startswith(("/", "\\")) or ".." in parts:
        raise UnsafePathError(
            f"{index_path}: shard {name!r} for {key!r} is not a plain name inside the checkpoint "
            "directory (absolute paths and '..' are refused)",
            file=index_path,
            key=key,
        )
    path = os.path.join(root, name)
    # lexists first (one lstat), so an index of a million absent names fails fast. It is not
    # exists(): a dangling or looping link is not absent but broken, and read_header says so
    # (as it does for a FIFO or device, which must be refused before anything opens it).
    if not os.path.lexists(path):
        similar = folded.like(name)
        hint = f" ({', '.join(map(repr, similar))} differs only in case or Unicode normalisation)" if similar else ""
        raise MissingShardError(
            f"{index_path}: shard {name!r} (holding {key!r}) does not exist in {root}{hint}; "
            "the download is incomplete",
            file=path,
            key=key,
        )
    if not inside(path, roots):
        raise UnsafePathError(
            f"{index_path}: shard {name!r} for {key!r} is a link that leaves the checkpoint "
            f"directory (it points to {os.path.realpath(path)}); copy the file into the directory instead",
            file=path,
            key=key,
        )
    if os.path.isdir(path):
        raise MissingShardError(
            f"{index_path}: shard {name!r} (holding {key!r}) is a directory, not a file",
            file=path,
            key=key,
        )
    return path


def _read_index(root: str, index_path: str, problems: list[CheckpointError] | None) -> dict[str, str]:
    """weight_map, validated: on-disk key -> absolute shard path (keys of bad shards left out
    when ``problems`` collects the errors)."""
    index = _load_json(index_path, "the index")
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict):
        raise CorruptCheckpointError(
            f"{index_path}: expected a JSON object with a 'weight_map' object of "
            "tensor name -> shard file name",
            file=index_path,
        )
    if not weight_map:
        present = glob.glob(os.path.join(glob.escape(root), "*.safetensors"))
        if present:
            # Loading nothing from a directory full of weights is never what was meant.
            raise CorruptCheckpointError(
                f"{index_path}: weight_map is empty, but the directory holds "
                f"{len(present)} *.safetensors file(s) ({os.path.basename(sorted(present)[0])}...); "
                "the index is damaged: rewrite it or remove it",
                file=index_path,
            )
    roots = allowed_roots(root)
    folded = _Folded(root)
    resolved: dict[str, str] = {}
    by_name: dict[str, str | None] = {}
    for key, name in weight_map.items():
        hashable = name if isinstance(name, str) else repr(name)
        if hashable not in by_name:
            try:
                by_name[hashable] = _resolve_shard(root, name, key, index_path, roots, folded)
            except CheckpointError as e:
                raise_or_collect(problems, e)
                by_name[hashable] = None
        if by_name[hashable] is not None:
            resolved[key] = by_name[hashable]  # type: ignore[assignment]
    return resolved


def _explicit_weights(root: str, config: dict[str, Any] | None, config_path: str) -> str | None:
    """``config.json``'s ``transformers_weights``: the file transformers loads instead of
    looking for ``model.safetensors`` or the index."""
    name = (config or {}).get("transformers_weights")
    if name is None:
        return None
    if not isinstance(name, str) or not name.endswith((".safetensors", ".safetensors.index.json")):
        raise CorruptCheckpointError(
            f"{config_path}: transformers_weights must name a *.safetensors or "
            f"*.safetensors.index.json file, found {name!r}",
            file=config_path,
            key="transformers_weights",
        )
    check_name(name, "transformers_weights", file=config_path, key="transformers_weights")
    path = os.path.join(root, name)
    if os.path.isabs(name) or ".." in name.replace("\\", "/").split("/") or not inside(path, allowed_roots(root)):
        raise UnsafePathError(
            f"{config_path}: transformers_weights {name!r} is not a file inside the checkpoint directory",
            file=config_path,
            key="transformers_weights",
        )
    return path


def _find_files(path: str, explicit: str | None) -> tuple[str, str | None, list[str]]:
    """(root, index path or None, single file list) for any accepted form of ``path``."""
    check_name(path, "checkpoint path")
    if os.path.isdir(path):
        if explicit is not None:
            return (path, explicit, []) if explicit.endswith(".json") else (path, None, [explicit])
        # transformers' order. lexists: a broken link or a non-file under either name is an
        # error when read, not a reason to look elsewhere.
        single = os.path.join(path, SINGLE_NAME)
        if os.path.lexists(single):
            return path, None, [single]
        index_path = os.path.join(path, INDEX_NAME)
        if os.path.lexists(index_path):
            return path, index_path, []
        return path, None, _lone_file(path)
    if os.path.lexists(path):
        # A file, or something that is not (a FIFO, a broken link): reading it says which.
        if path.endswith(".json"):
            return os.path.dirname(path) or ".", path, []
        return os.path.dirname(path) or ".", None, [path]
    raise MissingShardError(f"{path}: no such file or directory", file=path)


def _lone_file(path: str) -> list[str]:
    files = sorted(glob.glob(os.path.join(glob.escape(path), "*.safetensors")))
    if len(files) == 1:
        part = _SHARD_NAME.search(os.path.basename(files[0]))
        if part and int(part.group(2)) > 1:
            # An interrupted download or conversion: never read it as a whole checkpoint.
            raise MissingShardError(
                f"{path}: holds only {os.path.basename(files[0])}, shard {int(part.group(1))} of "
                f"{int(part.group(2))}, and no {INDEX_NAME}; the download or conversion is incomplete",
                file=files[0],
            )
        return files
    if not files:
        raise MissingShardError(
            f"{path}: holds neither {INDEX_NAME} nor a *.safetensors file", file=path
        )
    names = ", ".join(os.path.basename(f) for f in files[:4])
    raise MissingShardError(
        f"{path}: holds {len(files)} *.safetensors files ({names}...) but no {INDEX_NAME}; "
        "pass the path of one file, or add the index",
        file=path,
    )


def _read_config(config_path: str, problems: list[CheckpointError] | None) -> dict[str, Any] | None:
    if not os.path.lexists(config_path):
        return None
    try:
        config = _load_json(config_path, os.path.basename(config_path))
        if not isinstance(config, dict):
            raise CorruptCheckpointError(
                f"{config_path}: expected a JSON object, found {type(config).__name__}", file=config_path
            )
        return config
    except CheckpointError as e:
        raise_or_collect(problems, e)
        return None


def _both_forms(root: str) -> CorruptCheckpointError | None:
    """The ambiguity of a directory holding ``model.safetensors`` and an index: read like
    transformers reads it (the single file), but worth a line in ``inspect``."""
    index = os.path.join(root, INDEX_NAME)
    if not os.path.lexists(index):
        return None
    return CorruptCheckpointError(
        f"{root}: holds both {SINGLE_NAME} and {INDEX_NAME}; lazyfp8 and transformers read "
        f"{SINGLE_NAME} and ignore the index: remove the one that is stale",
        file=index,
    )


def open_checkpoint(
    path: str | os.PathLike[str],
    problems: list[CheckpointError] | None = None,
    *,
    revision: str | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    local_files_only: bool = False,
    token: Any = None,
) -> Checkpoint:
    """Locate and read every header of the checkpoint at ``path``: a local path, or a Hugging
    Face Hub repo id.

    A ``path`` that names no local file or directory and has the form ``org/name`` is a Hub repo
    id (a local path always wins): huggingface_hub resolves it to a snapshot of its cache
    (``cache_dir``, default ``HF_HUB_CACHE``) at ``revision`` (a branch, tag or commit hash;
    default the main branch). Missing files are downloaded unless ``local_files_only`` or
    ``HF_HUB_OFFLINE=1``, and only the files read here: ``config.json``,
    ``hf_quant_config.json``, the index (or the single ``*.safetensors`` file, chosen as for a
    directory) and the shards the index names. ``token`` is passed to huggingface_hub.

    With ``problems`` given, errors confined to one file or tensor (a missing or damaged shard,
    an index entry its shard does not hold, a damaged ``config.json``) are appended there and
    that file or tensor is left out, so that every problem can be reported at once; an index
    beside ``model.safetensors`` (read as transformers reads it: the single file) is reported
    there too.

    Raises:
        RepoNotCachedError: a repo id whose files are not cached where nothing is downloaded
            (offline, ``local_files_only``, no network, huggingface_hub not installed); the
            message gives the command that fetches them.
        ValueError: ``revision`` or ``cache_dir`` with a local path (they apply to repo ids).
        MissingShardError: nothing to read at ``path``, or the index names an absent shard.
        UnsafePathError: the index names a shard outside the directory, or a file is not a
            regular file (a FIFO, device or directory) or a looping link; a repo id's revision,
            ref, snapshot or ``blobs/`` that leads out of its cache folder.
        CorruptCheckpointError: a damaged index, header or ``config.json``, an empty index
            beside shards, or the index names a tensor its shard does not hold; a Hub cache ref
            that holds no commit hash.
        ShardChangedError: never here; raised by reads when a file changes afterwards.
    """
    path = os.fsdecode(os.fspath(path))
    if not is_repo_id(path):
        if revision is not None or cache_dir is not None:
            given = "revision" if revision is not None else "cache_dir"
            raise ValueError(
                f"{given}= applies to a Hugging Face Hub repo id, but {path!r} is a local path (or not "
                f"of the form 'org/name'); a local path always wins over a repo id: drop {given}=, or "
                "pass the snapshot directory in the Hub cache"
            )
        return _open_path(path, problems)
    repo = open_repo(
        path,
        revision=revision,
        cache_dir=cache_dir,
        local_files_only=local_files_only,
        token=token,
        first=(CONFIG_NAME, QUANT_CONFIG_NAME, INDEX_NAME),
    )
    if repo.source.downloads:
        _fetch_weights(repo)
    before = 0 if problems is None else len(problems)
    try:
        ckpt = _open_path(repo.folder, problems)
    except MissingShardError as e:
        raise _not_cached(repo, e) from e
    if problems is not None:
        problems[before:] = [_not_cached(repo, p) if isinstance(p, MissingShardError) else p for p in problems[before:]]
    return dataclasses.replace(ckpt, hub=repo.source)


def _fetch_weights(repo: HubRepo) -> None:
    """Download the weights of a repo's snapshot: the file a directory means (transformers' order,
    as :func:`_find_files`, from the repo's file list) and, for an index, the shards it names.
    A damaged config or index fetches nothing more; reading the snapshot then says what is wrong."""
    root = repo.folder
    config_path = os.path.join(root, CONFIG_NAME)
    try:
        explicit = _explicit_weights(root, _read_config(config_path, None), config_path)
    except CheckpointError:
        explicit = None
    if explicit is not None:
        first: str | None = os.path.relpath(explicit, root).replace(os.sep, "/")
    elif repo.has(SINGLE_NAME):
        first = SINGLE_NAME
    elif repo.has(INDEX_NAME):
        first = INDEX_NAME
    else:
        lone = [n for n in (repo.listing or ()) if "/" not in n and n.endswith(".safetensors")]
        part = _SHARD_NAME.search(lone[0]) if len(lone) == 1 else None
        # Several files, or one shard of many: _lone_file refuses them, so nothing is fetched.
        first = lone[0] if len(lone) == 1 and not (part and int(part.group(2)) > 1) else None
    if first is None:
        return
    repo.fetch([first])
    if first.endswith(".json"):
        try:
            index = _load_json(os.path.join(root, first), "the index")
        except CheckpointError:
            return
        weight_map = index.get("weight_map") if isinstance(index, dict) else None
        if isinstance(weight_map, dict):
            repo.fetch(sorted({n for n in weight_map.values() if isinstance(n, str)}))


def _not_cached(repo: HubRepo, error: MissingShardError) -> MissingShardError:
    """A missing file of a snapshot nothing is downloaded for, as the error that says how to
    fetch it; with downloads on, the repo itself lacks it and ``error`` stands."""
    if repo.source.downloads or isinstance(error, RepoNotCachedError):
        return error
    file = error.file
    if file and os.path.abspath(file) != os.path.abspath(repo.folder) and _inside_folder(file, repo.folder):
        names: tuple[str, ...] = (os.path.relpath(file, repo.folder).replace(os.sep, "/"),)
    else:
        names = repo.include
    return repo.not_cached(names, str(error), file=file, key=error.key)


def _inside_folder(path: str, folder: str) -> bool:
    """Whether ``path`` names a file under ``folder`` (links not resolved: a link in a snapshot
    is named by its place there)."""
    a, f = os.path.abspath(path), os.path.abspath(folder)
    return os.path.commonpath([a, f]) == f


def _open_path(path: str, problems: list[CheckpointError] | None) -> Checkpoint:
    """:func:`open_checkpoint` for a local path."""
    root = path if os.path.isdir(path) else (os.path.dirname(path) or ".")
    config_path = os.path.join(root, CONFIG_NAME)
    config = _read_config(config_path, problems)
    explicit = None
    if os.path.isdir(path):
        try:
            explicit = _explicit_weights(root, config, config_path)
        except CheckpointError as e:
            raise_or_collect(problems, e)
    root, index_path, files = _find_files(path, explicit)

    shards: dict[str, ShardHeader] = {}
    tensors: dict[str, tuple[str, TensorEntry]] = {}
    bad: set[str] = set()

    def header_of(shard: str) -> ShardHeader | None:
        if shard not in shards and shard not in bad:
            try:
                shards[shard] = read_header(shard)
            except CheckpointError as e:
                raise_or_collect(problems, e)
                bad.add(shard)
        return shards.get(shard)

    if index_path is None:
        header = header_of(files[0])
        if header is not None:
            tensors = {k: (files[0], e) for k, e in header.tensors.items()}
    else:
        try:
            weight_map = _read_index(root, index_path, problems)
        except CheckpointError as e:
            raise_or_collect(problems, e)
            weight_map = {}
        for key, shard in weight_map.items():
            header = header_of(shard)
            if header is None:
                continue
            entry = header.tensors.get(key)
            if entry is None:
                raise_or_collect(problems, CorruptCheckpointError(
                    f"{index_path}: names {key!r} in {os.path.basename(shard)}, "
                    "but that shard does not hold it",
                    file=shard,
                    key=key,
                ))
                continue
            tensors[key] = (shard, entry)
    if problems is not None and os.path.isdir(path) and explicit is None and index_path is None:
        if os.path.basename(files[0]) == SINGLE_NAME and (both := _both_forms(root)) is not None:
            problems.append(both)
    quant_config = _read_config(os.path.join(root, QUANT_CONFIG_NAME), problems)
    return Checkpoint(
        root=root, shards=shards, tensors=tensors, config=config, index_path=index_path, quant_config=quant_config
    )
