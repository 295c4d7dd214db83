"""Hugging Face Hub repo ids: ``"org/name"`` becomes a snapshot directory of huggingface_hub's cache.

A path that names no local file or directory and has the Hub's ``namespace/name`` form is a repo
id; a local path always wins. huggingface_hub itself resolves it: its cache first (``HF_HUB_CACHE``
or ``cache_dir``, laid out as ``models--org--name/{blobs,refs,snapshots}``), a download only when
one is allowed (not with ``local_files_only=True`` or ``HF_HUB_OFFLINE=1``), and only the files
asked for: :func:`open_repo` fetches the small side files, then the checkpoint layer fetches the
weights it will read (:meth:`HubRepo.fetch`), so a repo's other files (``*.bin``,
``consolidated.safetensors``, GGUF) are never downloaded. Nothing here lays out the cache.

huggingface_hub is optional (the ``cli`` and ``save`` extras): it is imported when a repo id is
opened, and its absence is an error that says what to install.

What this module adds to huggingface_hub is what it does not check, because the cache is an input
like any other (docs/formats.md, "Files"): a revision that is a path (``../..``), a ref file whose
content is not a commit hash (huggingface_hub joins a ref's content into a path as it is), and a
snapshot or ``blobs/`` directory that leads out of the repo's cache folder. Each is a
:class:`~lazyfp8.errors.CheckpointError` naming the path, raised before anything there is read.
"""

from __future__ import annotations

import dataclasses
import os
import re
import shlex
from collections.abc import Iterable, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

from ..errors import CorruptCheckpointError, MissingShardError, RepoNotCachedError, UnsafePathError
from .files import inside, open_error, read_regular

__all__ = ["HubRepo", "HubSource", "is_repo_id", "open_repo"]

# huggingface_hub's validate_repo_id (which decides) with the namespace required: a bare "name"
# is far more often a mistyped local directory than one of the Hub's legacy un-namespaced repos.
_REPO_ID = re.compile(r"[\w.-]{1,96}/[\w.-]{1,96}")
# Names of files, never of repos: a mistyped "out/model.safetensors" is a missing file.
_FILE_SUFFIXES = (".safetensors", ".json")
_INSTALL = "pip install huggingface_hub (or pip install 'lazyfp8[cli]')"
# What an `hf download` hint adds to the side files when the shards' names are not known yet:
# the weights under their conventional names (model.safetensors, model-00001-of-00002...).
_WEIGHTS_PATTERN = "model*.safetensors"
_REF_BYTES = 4096


def is_repo_id(path: str) -> bool:
    """Whether ``path`` is to be read as a Hub repo id: it names no local file, directory or link,
    has the form ``namespace/name`` (letters, digits, ``-``, ``_``, ``.``), and does not end in
    ``.safetensors`` or ``.json``. huggingface_hub's own validation decides the rest when it is
    opened."""
    return (
        isinstance(path, str)
        and _REPO_ID.fullmatch(path) is not None
        and not path.endswith(_FILE_SUFFIXES)
        and not os.path.lexists(path)
    )


@dataclasses.dataclass(frozen=True)
class HubSource:
    """Where a checkpoint opened by repo id lies in the Hub cache.

    Attributes:
        repo_id: ``"org/name"``.
        revision: the revision asked for (``None``: the default branch).
        commit: the commit hash it resolved to: the snapshot's name.
        cache_dir: the Hub cache, absolute (``HF_HUB_CACHE`` unless ``cache_dir=`` was given).
        folder: the snapshot directory, ``<cache_dir>/models--org--name/snapshots/<commit>``.
        downloads: whether missing files were fetched from the Hub (``False`` offline, with
            ``local_files_only=True``, or when the Hub could not be reached).
    """

    repo_id: str
    revision: str | None
    commit: str
    cache_dir: str
    folder: str
    downloads: bool


class HubRepo:
    """A repo's snapshot being opened: which files the repo has, and fetching some of them."""

    def __init__(
        self,
        hf: ModuleType,
        source: HubSource,
        listing: frozenset[str] | None,
        token: Any,
        why: str,
        first: Sequence[str],
        given_cache: bool = False,
    ):
        self._hf = hf
        self.source = source
        self._given_cache = given_cache  # a fetch hint names the cache only when it was chosen
        #: What a fetch hint names when the missing files are not known one by one.
        self.include = (*first, _WEIGHTS_PATTERN)
        #: The repo's files at ``source.commit`` when known (downloads allowed), else ``None``.
        self.listing = listing
        self._token = token
        self._why = why  # why nothing is downloaded, for messages

    @property
    def folder(self) -> str:
        return self.source.folder

    def has(self, name: str) -> bool:
        """Whether the repo has file ``name`` (from its file list; offline, from the snapshot)."""
        if self.listing is not None:
            return name in self.listing
        return os.path.lexists(os.path.join(self.folder, name))

    def fetch(self, names: Iterable[str]) -> None:
        """Download those of ``names`` (paths in the repo) the cache lacks, into the snapshot;
        nothing when downloads are off. A name that is not a plain relative path (``..``,
        absolute, ending in ``/``) is skipped, not turned into a pattern: the checkpoint reader
        refuses it, naming it."""
        plain = [n for n in names if _plain(n)]
        if not self.source.downloads or not plain:
            return
        patterns = [_literal(n) for n in plain]
        s = self.source
        try:
            self._hf.snapshot_download(
                s.repo_id, revision=s.commit, cache_dir=s.cache_dir, token=self._token, allow_patterns=patterns
            )
        except self._hf.utils.LocalEntryNotFoundError as e:
            raise self.not_cached(plain, str(e)) from e

    def not_cached(self, names: Sequence[str], detail: str, *, file: str | None = None, key: str | None = None) -> RepoNotCachedError:
        """The error for files of this snapshot missing from the cache, with the command that
        fetches them."""
        s = self.source
        return RepoNotCachedError(
            f"{detail}; {s.repo_id} (commit {s.commit}) is only partly in the Hugging Face cache "
            f"{s.cache_dir} and nothing is downloaded ({self._why or 'the Hub could not be reached'}). "
            "Fetch the missing files with:\n"
            f"    {_command(self._hf, s.repo_id, s.commit, s.cache_dir if self._given_cache else None, names)}\n"
            f"{_or_let_us(s.repo_id, offline=bool(self._why))}",
            repo_id=s.repo_id,
            revision=s.revision,
            file=file,
            key=key,
        )


def open_repo(
    repo_id: str,
    *,
    revision: str | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    local_files_only: bool = False,
    token: Any = None,
    first: Sequence[str] = (),
) -> HubRepo:
    """Resolve ``repo_id`` at ``revision`` to its snapshot in the Hub cache, fetching ``first``
    (names in the repo; those it does not have are skipped) when downloads are allowed.

    Raises:
        RepoNotCachedError: huggingface_hub is not installed, or the revision is not cached
            and may not (``local_files_only``, ``HF_HUB_OFFLINE``) or cannot be downloaded.
        MissingShardError: ``repo_id`` is not a valid repo id, or the Hub has no such repo or
            revision (or it is private or gated and ``token`` does not open it).
        UnsafePathError: ``revision`` is not a ref name (``..``, absolute), or a ref, snapshot
            or ``blobs/`` directory leads out of the repo's cache folder.
        CorruptCheckpointError: the cache's ref file for ``revision`` holds no commit hash.
    """
    hf = _import(repo_id, revision)
    try:
        hf.utils.validate_repo_id(repo_id)
    except hf.utils.HFValidationError as e:
        raise MissingShardError(f"{repo_id}: no such file or directory (nor a Hub repo id: {e})", file=repo_id) from None
    _check_revision(repo_id, revision)
    given_cache = cache_dir is not None
    cache = str(Path(os.fspath(cache_dir) if given_cache else hf.constants.HF_HUB_CACHE).expanduser().resolve())
    storage = os.path.join(cache, hf.file_download.repo_folder_name(repo_id=repo_id, repo_type="model"))
    offline = bool(local_files_only or hf.constants.HF_HUB_OFFLINE)
    why = "local_files_only=True" if local_files_only else "HF_HUB_OFFLINE=1" if offline else ""
    asked = revision if revision is not None else hf.constants.DEFAULT_REVISION
    _check_inside(storage, "blobs", repo_id)
    commit = _cached_commit(hf, storage, asked, repo_id)
    try:
        # Offline, the commit read (and checked) above: huggingface_hub would read the ref again.
        folder = hf.snapshot_download(
            repo_id,
            revision=commit if offline and commit else asked,
            cache_dir=cache,
            token=token,
            local_files_only=offline,
            allow_patterns=[_literal(n) for n in first] or None,
        )
    except hf.utils.LocalEntryNotFoundError as e:
        reason = why or f"the Hub could not be reached: {e.__cause__ or e}"
        # huggingface_hub knows which files are missing when it kept the repo's file list.
        missing = f" ({str(e).split('. ')[0]})" if getattr(e, "snapshot_path", None) else ""
        raise RepoNotCachedError(
            f"{repo_id!r} is not a local file or directory, and the Hugging Face cache {cache} holds "
            f"no {'complete ' if commit else ''}snapshot of that Hub repo at revision {asked!r}{missing}; "
            f"nothing is downloaded ({reason}). Fetch it first with:\n"
            f"    {_command(hf, repo_id, revision, cache if given_cache else None, (*first, _WEIGHTS_PATTERN))}\n"
            f"{_or_let_us(repo_id, offline=offline)}",
            repo_id=repo_id,
            revision=revision,
            file=repo_id,
        ) from e
    except (hf.utils.RepositoryNotFoundError, hf.utils.RevisionNotFoundError) as e:
        what = "revision" if isinstance(e, hf.utils.RevisionNotFoundError) else "repo"
        raise MissingShardError(
            f"{repo_id!r} is not a local file or directory, and the Hugging Face Hub has no such {what} "
            f"visible to this token ({type(e).__name__}: {str(e).splitlines()[0]}); a private or "
            "gated repo needs token= or `hf auth login`",
            file=repo_id,
        ) from e
    folder = _check_snapshot(hf, storage, os.fspath(folder), repo_id)
    commit = os.path.basename(folder)
    # None online too when the Hub could not be reached (huggingface_hub returned the cache).
    listing = None if offline else _listing(hf, repo_id, commit, cache, token)
    source = HubSource(repo_id, revision, commit, cache, folder, downloads=listing is not None)
    return HubRepo(hf, source, listing, token, why, first, given_cache)


def _import(repo_id: str, revision: str | None) -> ModuleType:
    try:
        import huggingface_hub
        import huggingface_hub.constants
        import huggingface_hub.file_download
        import huggingface_hub.utils
    except ImportError as e:
        raise RepoNotCachedError(
            f"{repo_id!r} is not a local file or directory; read as a Hugging Face Hub repo id it "
            f"needs huggingface_hub, which is not importable ({e}): {_INSTALL}",
            repo_id=repo_id,
            revision=revision,
            file=repo_id,
        ) from e
    return huggingface_hub


def _check_revision(repo_id: str, revision: str | None) -> None:
    if revision is None:
        return
    if not isinstance(revision, str):
        raise TypeError(f"revision must be a str (a branch, tag or commit hash), not {type(revision).__name__}")
    parts = revision.split("/")
    if "\x00" in revision or "\\" in revision or any(p in ("", ".", "..") for p in parts):
        raise UnsafePathError(
            f"{repo_id}: revision {revision!r} is not a branch, tag or commit hash (empty, '.' or '..' "
            "parts, absolute paths, backslashes and NUL are refused: the cache stores refs as paths)",
            file=repo_id,
        )


def _check_inside(storage: str, name: str, repo_id: str) -> None:
    """``storage/name``, if present, must resolve inside the repo's cache folder: the checkpoint
    reader accepts links into ``blobs/``, so ``blobs/`` itself must not lead elsewhere."""
    path = os.path.join(storage, name)
    if os.path.lexists(path) and not inside(path, [os.path.realpath(storage)]):
        raise UnsafePathError(
            f"{path}: the Hub cache's {name}/ of {repo_id} is a link out of {storage} "
            f"(to {os.path.realpath(path)}); the cache is damaged: delete {storage} and download again",
            file=path,
        )


def _cached_commit(hf: ModuleType, storage: str, asked: str, repo_id: str) -> str | None:
    """The commit ``asked`` names: itself when it is a commit hash, else what the cache's ref file
    records (``None`` when there is none), checked to be a commit hash."""
    if hf.file_download.REGEX_COMMIT_HASH.fullmatch(asked):
        return asked
    refs = os.path.join(storage, "refs")
    ref = os.path.join(refs, asked)
    if not os.path.lexists(ref):
        return None
    if not inside(ref, [os.path.realpath(refs)]):
        raise UnsafePathError(
            f"{ref}: the Hub cache's ref for revision {asked!r} of {repo_id} is a link out of {refs} "
            f"(to {os.path.realpath(ref)}); delete it (the next download rewrites it)",
            file=ref,
        )
    try:
        raw = read_regular(ref, "Hub cache ref", _REF_BYTES + 1)
    except OSError as e:
        raise open_error(e, ref, "Hub cache ref") from e
    text = raw[:_REF_BYTES].decode("utf-8", "replace").strip()
    if len(raw) > _REF_BYTES or not hf.file_download.REGEX_COMMIT_HASH.fullmatch(text):
        raise CorruptCheckpointError(
            f"{ref}: the Hub cache's ref for revision {asked!r} of {repo_id} holds {text[:80]!r}, not a "
            "40-hex commit hash; the cache is damaged: delete this file (the next download rewrites "
            "it) or pass revision=<commit hash>",
            file=ref,
        )
    return text


def _check_snapshot(hf: ModuleType, storage: str, folder: str, repo_id: str) -> str:
    """``folder`` (what huggingface_hub returned) if it is ``storage/snapshots/<commit hash>``."""
    snapshots = os.path.join(storage, "snapshots")
    real = os.path.realpath(folder)
    if (
        os.path.dirname(real) != os.path.realpath(snapshots)
        or not hf.file_download.REGEX_COMMIT_HASH.fullmatch(os.path.basename(real))
        or not os.path.isdir(real)
    ):
        raise UnsafePathError(
            f"{folder}: huggingface_hub resolved {repo_id} to a folder that is not a snapshot in its "
            f"cache ({snapshots}/<commit hash>, resolving to {real}); the cache is damaged: delete "
            f"{storage} and download again",
            file=folder,
        )
    return os.path.join(snapshots, os.path.basename(real))


def _listing(hf: ModuleType, repo_id: str, commit: str, cache: str, token: Any) -> frozenset[str] | None:
    """The repo's files at ``commit``, as huggingface_hub listed them for the download just made,
    or ``None`` when it could not reach the Hub (it then returned the cached snapshot)."""
    cached_tree = getattr(hf, "get_cached_repo_tree", None)
    if cached_tree is not None:
        # huggingface_hub >= 2 keeps the listing it downloaded by (trees/<commit>.json).
        from huggingface_hub.errors import CachedRepoTreeNotFoundError

        try:
            return frozenset(f.path for f in cached_tree(repo_id, revision=commit, cache_dir=cache))
        except CachedRepoTreeNotFoundError:
            return None
    try:
        return frozenset(hf.HfApi(token=token).list_repo_files(repo_id, revision=commit))
    except (OSError, ConnectionError):
        return None


def _plain(name: object) -> bool:
    """A relative path in a repo that matches only itself once made :func:`_literal`."""
    if not isinstance(name, str) or not name or "\x00" in name or "\\" in name or name.endswith("/"):
        return False
    return not name.startswith("/") and all(p not in ("", ".", "..") for p in name.split("/"))


def _literal(name: str) -> str:
    """``name`` as an fnmatch pattern (huggingface_hub's allow_patterns) matching only itself."""
    return re.sub(r"([*?\[])", r"[\1]", name)


def _cli(hf: ModuleType) -> str:
    # `hf` replaced `huggingface-cli` in huggingface_hub 0.34 (and is the only one from 1.0).
    try:
        major, minor = (int(p) for p in hf.__version__.split(".")[:2])
    except ValueError:
        return "hf"
    return "hf" if (major, minor) >= (0, 34) else "huggingface-cli"


def _command(hf: ModuleType, repo_id: str, revision: str | None, cache_dir: str | None, names: Iterable[str]) -> str:
    words = [_cli(hf), "download", repo_id]
    if revision is not None:
        words += ["--revision", revision]
    if cache_dir is not None:
        words += ["--cache-dir", cache_dir]
    return " ".join([*map(shlex.quote, words), "--include", *map(shlex.quote, names)])


def _or_let_us(repo_id: str, *, offline: bool) -> str:
    if not offline:
        return "or check the connection to the Hub (and HF_ENDPOINT) and open it again"
    return (
        f"or let lazyfp8 download what it reads (the index, config.json, hf_quant_config.json and the "
        f"shards the index names): unset HF_HUB_OFFLINE and open {repo_id!r} with local_files_only=False"
    )
