"""Fetch the weight files a config names, into the config's own paths.

    python -m lynx.fetch --config configs/LYNX.yaml [--dry-run] [--both-checkpoints] [--release-url URL]
    python -m lynx.fetch --check-media --config configs/LYNX.yaml      which media of the test files are missing

`vit_checkpoint` gets EVA01_g_psz14.pt of the hub repo QuanSun/EVA-CLIP under the config's name; the LLM folder
(`llm_path`, else data/<LLM>) the files transformers reads of lmsys/vicuna-7b-v1.1; `checkpoint` finetune_lynx.pt
or pretrain_lynx.pt from the release URL. Hub files come through huggingface_hub (HF_ENDPOINT, HF_TOKEN and
HF_HOME work as usual). Each file is downloaded to `<file>.partial` (a stopped download resumes), verified, then
renamed: hub files against the hub's sha256 (a corrupted download is fetched once more), release files, which
have no published checksum, by the shape check the run makes before loading. The sha256 of every fetched file
goes into SHA256SUMS beside it, and a later run checks the files against it.

Exit status: 0 every file there and verified; 1 something missing or wrong (said on stderr); 130 interrupted.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import re
import sys

import httpx2

from configs.schema import load_config
from errors import InputError, described
from lynx import transfer
from models.weight_files import EVA_FILE, EVA_REPO, LLM_REPOS, LLM_SIDE_FILES, LLM_WEIGHTS, RELEASE_URL, \
    RELEASED_CHECKPOINTS, command, llm_folder_gaps, missing_message, missing_weight_files


@dataclasses.dataclass
class Item:
    """A file to bring: where the run reads it, where it comes from, and what it must match."""

    path: str
    source: str  # shown in the listing
    url: str
    size: int | None
    from_hub: bool = False
    sha256: str | None = None  # the hub's, for a file it keeps in LFS
    blob_id: str | None = None  # the hub's git object id, for a file it keeps in git

    @property
    def partial(self) -> str:
        return self.path + transfer.PARTIAL

    def arrived(self) -> int:
        """Bytes an earlier, stopped download left in the partial file."""
        return os.path.getsize(self.partial) if os.path.isfile(self.partial) else 0


class Hub:
    """The model hub through huggingface_hub: a repo's listing (commit, sizes, checksums) and its HTTP session."""

    def __init__(self):
        from huggingface_hub import HfApi, constants, get_session
        from huggingface_hub.utils import build_hf_headers

        self.api, self.endpoint, self.listings = HfApi(), constants.ENDPOINT, {}
        self.session, self.headers = get_session(), build_hf_headers(library_name="lynx")

    def files(self, repo: str) -> tuple[str, dict]:
        """The commit the repo's main branch is at, and its files by name."""
        if repo not in self.listings:
            try:
                info = self.api.model_info(repo, files_metadata=True)
            except (httpx2.HTTPError, OSError) as err:
                raise InputError(f"cannot list {repo} on the model hub {self.endpoint} ({described(err)}); the hub "
                                 f"is read through huggingface_hub: HF_ENDPOINT, HF_TOKEN, HF_HUB_OFFLINE") from None
            self.listings[repo] = (info.sha, {f.rfilename: f for f in info.siblings or []})
        return self.listings[repo]

    def item(self, repo: str, name: str, path: str) -> Item:
        from huggingface_hub import hf_hub_url

        commit, files = self.files(repo)
        if name not in files:
            raise InputError(f"{repo} on the model hub {self.endpoint} has no file {name}")
        entry = files[name]
        return Item(path, f"hub {repo}/{name}", hf_hub_url(repo, name, revision=commit), entry.size,
                    from_hub=True, sha256=entry.lfs.sha256 if entry.lfs else None, blob_id=entry.blob_id)


def llm_repo_files(repo: str, names) -> list[str]:
    """What transformers reads of an LLM repo: its config and tokenizer files and one form of its weights, the first
    of LLM_WEIGHTS the repo has (an index with the shards named after it)."""
    for form in LLM_WEIGHTS:
        if form in names:
            weights = [form]
            if form.endswith(".index.json"):
                stem, suffix = os.path.splitext(form[:-len(".index.json")])
                shard = re.compile(rf"{re.escape(stem)}-\d+-of-\d+{re.escape(suffix)}")
                weights += sorted(name for name in names if shard.fullmatch(name))
            return [name for name in LLM_SIDE_FILES if name in names] + weights
    raise InputError(f"{repo} holds no LLM weights in a form transformers reads ({', '.join(LLM_WEIGHTS)})")


def release_item(web: httpx2.Client, base_url: str, path: str) -> Item:
    url = base_url.rstrip("/") + "/" + os.path.basename(path)
    try:
        answer = web.head(url)
    except httpx2.HTTPError as err:
        raise InputError(f"cannot reach the release URL {url} ({described(err)})") from None
    if answer.status_code >= 400:
        raise InputError(f"{url}: HTTP {answer.status_code} {answer.reason_phrase}")
    size = answer.headers.get("Content-Length")
    return Item(path, url, url, int(size) if size and size.isdigit() else None)


def plan(cfg, hub: Hub, web: httpx2.Client, release_url: str, both: bool) -> tuple[list[str], list[list[Item]]]:
    """What is there (files, or the LLM folder when complete) and what to bring, in groups whose files are renamed
    together once all are verified: the ViT file, the LLM folder's files, each checkpoint. Only what is missing is
    looked up remotely; a path that looks mistyped, or names no released file, is refused first."""
    unknown = [missing for missing in missing_weight_files(cfg) if missing.source is None]
    if unknown:
        raise InputError(missing_message(unknown, None))
    present, groups = [], []
    if os.path.isfile(cfg.vit_checkpoint):
        present.append(cfg.vit_checkpoint)
    else:
        groups.append([hub.item(EVA_REPO, EVA_FILE, cfg.vit_checkpoint)])
    if llm_folder_gaps(cfg.llm_dir):
        repo = LLM_REPOS[cfg.LLM]
        paths = {name: os.path.join(cfg.llm_dir, name) for name in llm_repo_files(repo, hub.files(repo)[1])}
        present += [path for path in paths.values() if os.path.isfile(path)]
        groups.append([hub.item(repo, name, path) for name, path in paths.items() if not os.path.isfile(path)])
    else:
        present.append(cfg.llm_dir)
    checkpoints = [cfg.checkpoint]
    if both:
        folder = os.path.dirname(cfg.checkpoint)
        checkpoints += [os.path.join(folder, n) for n in RELEASED_CHECKPOINTS if n != os.path.basename(cfg.checkpoint)]
    for path in checkpoints:
        if os.path.isfile(path):
            present.append(path)
        else:
            groups.append([release_item(web, release_url, path)])
    return present, groups


def gb(size: int) -> str:
    return f"{size / 1e9:.2f} GB"


def size_text(size: int | None) -> str:
    if size is None:
        return "size unknown"
    return gb(size) if size >= 1e9 else f"{size / 1e6:.1f} MB" if size >= 1e6 else f"{size / 1e3:.1f} kB"


def show_plan(present: list[str], items: list[Item], dry_run: bool) -> None:
    """The files to bring (and with --dry-run those there, which a run checks instead)."""
    for path in present if dry_run else []:
        print(f"  there    {'':>10}  {path}")
    for item in items:
        state = f"partial {size_text(item.arrived())} of" if item.arrived() else "missing"
        print(f"  {state} {size_text(item.size):>10}  {item.path}  <- {item.source}")


def check_space(items: list[Item], dry_run: bool) -> None:
    """What the downloads need against what is free, per disk, before any starts."""
    need = {}
    for item in items:
        folder = transfer.existing_folder(item.path)
        where, size = need.get(os.stat(folder).st_dev, (folder, 0))
        need[os.stat(folder).st_dev] = (where, size + max((item.size or 0) - item.arrived(), 0))
    for folder, size in need.values():
        free = transfer.free_bytes(folder)
        print(f"to download: {gb(size)} into {folder}, where {gb(free)} are free")
        if size > free and not dry_run:
            raise InputError(f"not enough free disk space: the downloads need {gb(size)} in {folder}, where "
                             f"{gb(free)} are free; nothing was downloaded — free some space or point "
                             f"vit_checkpoint, llm_path and checkpoint at a larger disk")


def check_present(present: list[str]) -> None:
    """Each file fetched earlier against the sha256 recorded then; a changed one stops the fetch, untouched."""
    changed = []
    for path in present:
        files = transfer.recorded_files(path)
        if not files:
            print(f"  {path}: there, not fetched by lynx.fetch (not checked)")
        for file in files:
            if transfer.sha256_of(file, f"checking {os.path.basename(file)}") == transfer.recorded_sha256(file):
                print(f"  {file}: there, sha256 as when fetched")
            else:
                changed.append(file)
    if changed:
        raise InputError(f"changed since they were fetched (sha256 other than {transfer.MANIFEST} records): "
                         f"{', '.join(changed)} — corrupted, or replaced by other files; delete them and run this "
                         f"again to fetch them afresh, or delete their lines in {transfer.MANIFEST} to keep them")


def fetch_file(item: Item, client: httpx2.Client, headers: dict) -> str:
    """Download `item` into its partial file and verify it; returns its sha256. A hub file whose checksum differs
    is deleted and downloaded once more before the fetch fails."""
    os.makedirs(os.path.dirname(item.path) or ".", exist_ok=True)
    label = os.path.basename(item.path)
    for attempt in range(2):
        partial = transfer.PartialFile(item.path)
        sha256 = transfer.download(client, item.url, partial, item.size, label, headers)
        problem = hub_mismatch(item, sha256) if item.from_hub else None
        if problem is None:
            return sha256
        partial.remove()
        print(f"  {item.path}: {problem}; deleted" + ("" if attempt else ", fetching it once more"))
    raise InputError(f"{item.path}: the hub's checksum did not match twice ({problem}); the downloads were deleted — "
                     f"the hub or a mirror (HF_ENDPOINT) serves other bytes than it lists: try again later")


def hub_mismatch(item: Item, sha256: str) -> str | None:
    """How a downloaded hub file differs from the hub's listing (None when it matches)."""
    if item.sha256 is not None:
        return None if sha256 == item.sha256 else f"sha256 {sha256} is not the hub's {item.sha256}"
    if item.blob_id is None:
        return None
    blob = transfer.git_blob_sha1(item.partial)
    return None if blob == item.blob_id else f"git object id {blob} is not the hub's {item.blob_id}"


def check_fits(cfg, item: Item) -> None:
    """A release file (no published checksum) against the model's shapes, as a run checks it before loading."""
    from models.build import plan_lynx

    print(f"  checking {item.partial} against the model of this config (on the meta device)")
    try:
        plan_lynx(dataclasses.replace(cfg, checkpoint=item.partial))
    except InputError as err:
        raise InputError(f"{item.path}: the downloaded file does not fit this config, so it stays "
                         f"{item.partial}: {err}") from None


def fetch(cfg, args) -> int:
    hub = Hub()
    with httpx2.Client(follow_redirects=True, timeout=transfer.TIMEOUT) as web:
        present, groups = plan(cfg, hub, web, args.release_url, args.both_checkpoints)
        items = [item for group in groups for item in group]
        show_plan(present, items, args.dry_run)
        if items:
            check_space(items, args.dry_run)
        else:
            print("nothing to download")
        if args.dry_run:
            return 0
        check_present(present)
        for group in groups:
            shas = [fetch_file(i, hub.session, hub.headers) if i.from_hub else fetch_file(i, web, {}) for i in group]
            if not group[0].from_hub:
                check_fits(cfg, group[0])
            for item, sha256 in zip(group, shas):
                os.replace(item.partial, item.path)
                transfer.record_sha256(item.path, sha256)
                print(f"  {item.path}: fetched, {size_text(os.path.getsize(item.path))}, sha256 {sha256}")
    print(f"every weight file is there; answer with: {command('python generate.py', args.config, args.overrides)}")
    return 0


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="./configs/LYNX.yaml")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key, as generate.py's --set")
    parser.add_argument("--release-url", default=RELEASE_URL, help=f"where the Lynx checkpoints are ({RELEASE_URL})")
    parser.add_argument("--both-checkpoints", action="store_true",
                        help="also the other released checkpoint (pretrain_lynx.pt or finetune_lynx.pt), beside it")
    parser.add_argument("--dry-run", action="store_true",
                        help="list each file, its source and size and whether it is there; download nothing")
    parser.add_argument("--check-media", action="store_true",
                        help="instead: which media files of the config's test files are there, by data set")
    parser.add_argument("--list-missing", action="store_true", help="with --check-media: every missing path")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        if args.check_media:
            from lynx.media_check import check_media

            return check_media(cfg, args.list_missing)
        if cfg.converted is not None:
            raise InputError(f"the config reads a converted folder ({cfg.converted}); fetch the release files with a "
                             f"config that does not (--set converted=null), then convert them")
        print(f"weight files of {args.config} (relative paths from {os.getcwd()}):")
        return fetch(cfg, args)
    except InputError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted: what arrived is kept in the .partial files; run the same command again to resume",
              file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
