"""`mamba2 download`, model resolution, `info` and `models`, against a local stand-in for the Hub.

The CLI runs in a subprocess with HF_ENDPOINT pointing at tests/hub_server.py on 127.0.0.1
and its own HF cache; huggingface_hub is not patched. Transfers take the plain HTTP path
(the server offers no Xet). Assertions read the server's request log.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import pytest

import checkpoints
from hub_server import HubServer, Repo
from test_cli import default_sigint

SRC = str(Path(__file__).parents[1] / "src")
CODESTRAL = "mistralai/Mamba-Codestral-7B-v0.1"
MAMBA2_130M = "state-spaces/mamba2-130m"
NEOX = "EleutherAI/gpt-neox-20b"
TOKEN = "hf_good_token"


def _read_dir(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in d.iterdir() if p.is_file()}


@pytest.fixture(scope="module")
def repos(tmp_path_factory) -> dict[str, Repo]:
    """Tiny checkpoints, in the shape of the real repos they stand in for."""
    base = tmp_path_factory.mktemp("hub-repos")
    tok = base / "tok"
    checkpoints.train_tokenizer(tok)
    tokenizer = _read_dir(tok)
    shape = checkpoints.tiny_shape()
    sd = checkpoints.random_weights(shape, seed=11)
    readme = {"README.md": b"# a model card\n", ".gitattributes": b"*.safetensors filter=lfs\n"}

    hf = checkpoints.write_hf(base / "hf", shape, sd, shards=2)
    mistral = checkpoints.write_mistral(base / "mistral", shape, sd)
    codestral = {**_read_dir(hf), **_read_dir(mistral), **tokenizer, **readme,
                 "tokenizer.model.v3": b"\x0a\x0bsentencepiece model" * 100}

    ssm = checkpoints.write_mamba_ssm(base / "ssm", shape, checkpoints.random_weights(shape, seed=12))
    neox = {**tokenizer, "special_tokens_map.json": b'{"eos_token": "</s>"}', "README.md": b"# GPT-NeoX-20B\n",
            "config.json": json.dumps({"model_type": "gpt_neox", "hidden_size": 6144}).encode(),
            "pytorch_model-00001-of-00046.bin": os.urandom(50_000)}

    single = checkpoints.write_hf(base / "single", shape, checkpoints.random_weights(shape, seed=13))
    mistral_only = {**_read_dir(mistral), "tokenizer.model.v3": b"spm" * 100}
    gpt2 = {"config.json": json.dumps({"model_type": "gpt2"}).encode(), "model.safetensors": os.urandom(40_000)}
    return {
        CODESTRAL: Repo(codestral),
        MAMBA2_130M: Repo({**_read_dir(ssm), **readme}),
        NEOX: Repo(neox),
        "acme/tiny": Repo({**_read_dir(single), **tokenizer}, branches={"v1": ""}),
        "acme/gated": Repo({**_read_dir(single), **tokenizer}, gated=True),
        "acme/mistral-only": Repo(mistral_only),
        "acme/gpt2": Repo(gpt2),
    }


@pytest.fixture
def hub(repos):
    server = HubServer(repos, token=TOKEN).start()
    yield server
    server.stop()


@pytest.fixture
def env(hub, tmp_path):
    e = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGING"))}
    e.update(PYTHONPATH=SRC, COLUMNS="200", HF_ENDPOINT=hub.url, HF_HOME=str(tmp_path / "hf"),
             HF_HUB_CACHE=str(tmp_path / "hf" / "hub"), HF_HUB_DISABLE_XET="1")
    e.pop("CUDA_VISIBLE_DEVICES", None)
    return e


def mamba2(*args, env, limit_file_size=None, timeout=120):
    def limit():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit_file_size, limit_file_size))

    return subprocess.run([sys.executable, "-m", "mamba2_cli", *args], capture_output=True, env=env, timeout=timeout,
                          preexec_fn=limit if limit_file_size else None)


def ok(p):
    assert p.returncode == 0, p.stderr.decode()
    assert b"Traceback" not in p.stderr, p.stderr.decode()
    return p


def fails(p, *words: str):
    err = p.stderr.decode()
    assert p.returncode == 1, err
    assert "Traceback" not in err, err
    lines = err.rstrip("\n").splitlines()
    assert lines[-1].startswith("error: ") and sum(line.startswith("error") for line in lines) == 1, err
    for w in words:
        assert w in lines[-1], err
    return err


def snapshot(env, repo_id: str, repos) -> Path:
    return Path(env["HF_HUB_CACHE"]) / f"models--{repo_id.replace('/', '--')}" / "snapshots" / repos[repo_id].commit


HF_FILES = {"config.json", "model.safetensors.index.json", "model-00001-of-00002.safetensors",
            "model-00002-of-00002.safetensors", "tokenizer.json", "tokenizer_config.json"}
MISTRAL_FILES = {"params.json", "consolidated.safetensors", "tokenizer.json", "tokenizer_config.json"}


# ---------------------------------------------------------------------------------------
# Downloads


def test_download_fetches_one_format_then_runs_from_the_cache_with_the_hub_gone(hub, env, repos):
    p = ok(mamba2("download", "codestral", env=env))
    snap = snapshot(env, CODESTRAL, repos)
    assert p.stdout.decode().strip() == str(snap)
    assert {f.name for f in snap.iterdir()} == HF_FILES == hub.files_fetched()
    assert all(len(hub.gets(f)) == 1 for f in HF_FILES)
    # The cache is huggingface_hub's own: a ref, and snapshot links into content-addressed blobs.
    assert (snap.parents[1] / "refs" / "main").read_text() == repos[CODESTRAL].commit
    shard = snap / "model-00001-of-00002.safetensors"
    assert shard.is_symlink() and Path(os.path.realpath(shard)).name == repos[CODESTRAL].sha256[shard.name]
    err = p.stderr.decode()
    assert "fetching model-00001-of-00002.safetensors" in err and "\x1b[" not in err  # plain lines, no TTY
    assert "SHA-256 verified for 2" in err  # the two LFS shards

    hub.stop()
    n = len(hub.log)
    r = json.loads(ok(mamba2("run", "-m", "codestral", "-n", "4", "--json", "x = 1", env=env)).stdout)
    assert r["generated_tokens"] == 4 and r["revision"] == repos[CODESTRAL].commit
    assert len(hub.log) == n


def test_a_second_download_fetches_nothing(hub, env, repos):
    ok(mamba2("download", "acme/tiny", env=env))
    first = len(hub.log)
    p = ok(mamba2("download", "acme/tiny", env=env))
    again = hub.log[first:]
    assert [r.path for r in again] == ["/api/models/acme/tiny"]  # the commit is checked, no file is touched
    assert "nothing to fetch" in p.stderr.decode() and "SHA-256" not in p.stderr.decode()
    q = ok(mamba2("download", "-q", "acme/tiny", env=env))
    assert q.stderr == b"" and q.stdout.decode().strip() == str(snapshot(env, "acme/tiny", repos))


def test_progress_on_a_terminal_is_rich_bars_with_a_total(hub, env):
    import pty

    pid, fd = pty.fork()
    if pid == 0:
        os.execve(sys.executable, [sys.executable, "-m", "mamba2_cli", "download", "codestral"], env)
    out = b""
    try:
        while chunk := os.read(fd, 65536):
            out += chunk
    except OSError:
        pass
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, out.decode(errors="replace")
    text = out.decode(errors="replace")
    assert "total (4 files)" in text and "model-00001-of-00002.safetensors" in text and "━" in text


def test_mistral_format_takes_params_consolidated_and_tokenizer_json(hub, env, repos):
    from mamba2_cli.loader import load_model

    ok(mamba2("download", CODESTRAL, "--format", "mistral", env=env))
    snap = snapshot(env, CODESTRAL, repos)
    assert {f.name for f in snap.iterdir()} == MISTRAL_FILES == hub.files_fetched()
    m, tok = load_model(str(snap), "cpu", "float32")
    assert m.cfg.format == "mistral" and tok.vocab_size > 0


def test_mamba_ssm_repo_brings_the_gpt_neox_tokenizer_and_runs_by_repo_id(hub, env, repos):
    from mamba2_cli.config import read_config
    from mamba2_cli.hub import resolve_model_dir, tokenizer_dir
    from mamba2_cli.tokenizer import Tokenizer

    p = ok(mamba2("run", "-m", MAMBA2_130M, "-n", "3", "--json", "def f(x):", env=env))
    assert json.loads(p.stdout)["generated_tokens"] == 3
    assert "not in the local cache yet" in p.stderr.decode()
    assert hub.files_fetched() == {"config.json", "pytorch_model.bin", "tokenizer.json", "tokenizer_config.json",
                                   "special_tokens_map.json"}
    assert {r.path.split("/resolve/")[0] for r in hub.gets("tokenizer.json")} == {f"/{NEOX}"}
    assert not (snapshot(env, MAMBA2_130M, repos) / "tokenizer.json").exists()  # the repo's snapshot stays its own

    hub.stop()  # both are found in the cache from now on, by alias too
    n = len(hub.log)
    snap = resolve_model_dir("mamba2-130m", cache_dir=env["HF_HUB_CACHE"])
    assert snap == snapshot(env, MAMBA2_130M, repos)
    tok = tokenizer_dir(snap, read_config(snap), cache_dir=env["HF_HUB_CACHE"])
    assert tok == snapshot(env, NEOX, repos) and Tokenizer.from_dir(tok).vocab_size > 0
    assert len(hub.log) == n


def test_include_and_exclude(hub, env, repos):
    ok(mamba2("download", "codestral", "--include", "*.json", "--exclude", "tokenizer*", env=env))
    assert hub.files_fetched() == {"config.json", "params.json", "model.safetensors.index.json"}
    ok(mamba2("download", "codestral", "--exclude", "tokenizer_config.json", env=env))
    assert {f.name for f in snapshot(env, CODESTRAL, repos).iterdir()} == (HF_FILES | {"params.json"}) - {
        "tokenizer_config.json"}


def test_local_dir_gets_a_self_contained_copy(hub, env, tmp_path, repos):
    from mamba2_cli.loader import load_model

    d = tmp_path / "here"
    p = ok(mamba2("download", "mamba2-130m", "--local-dir", str(d), env=env))
    assert p.stdout.decode().strip() == str(d)
    assert {f.name for f in d.iterdir() if f.is_file()} == {"config.json", "pytorch_model.bin", "tokenizer.json",
                                                             "tokenizer_config.json", "special_tokens_map.json"}
    assert not Path(env["HF_HUB_CACHE"]).exists()
    load_model(str(d), "cpu", "float32", offline=True)
    n = len(hub.log)
    ok(mamba2("download", "mamba2-130m", "--local-dir", str(d), env=env))
    assert not [r for r in hub.log[n:] if r.file]


def test_a_dropped_connection_is_retried_in_the_same_run(hub, env, repos):
    shard = "model-00002-of-00002.safetensors"
    hub.drop_after[shard] = 20_000
    ok(mamba2("download", "codestral", env=env))
    gets = hub.gets(shard)
    assert len(gets) == 2 and gets[-1].status in (200, 206)
    data = (snapshot(env, CODESTRAL, repos) / shard).read_bytes()
    assert data == repos[CODESTRAL].files[shard]


def _leftovers(snap: Path) -> list[str]:
    """Temporary and lock files in a repo's cache folder (locks excepted)."""
    return sorted(p.name for p in snap.parents[1].rglob("*") if p.name.endswith((".incomplete", ".tmp")))


def test_an_interrupted_download_leaves_nothing_half_written_and_starts_over(hub, env, repos):
    import signal
    import time

    shard = "model-00001-of-00002.safetensors"
    data = repos[CODESTRAL].files[shard]
    snap = snapshot(env, CODESTRAL, repos)
    blobs = snap.parents[1] / "blobs"
    hub.hold[shard] = 40_000  # the rest waits for hub.release: the interrupt lands mid-file
    proc = subprocess.Popen([sys.executable, "-m", "mamba2_cli", "download", "codestral"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=env, preexec_fn=default_sigint)
    try:
        deadline = time.monotonic() + 120
        while not any(r.sent for r in hub.gets(shard)) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        assert proc.poll() is None and any(r.sent for r in hub.gets(shard)), "the download never started the shard"
        time.sleep(0.2)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        hub.release.set()
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130 and b"Traceback" not in err, err.decode()
    sha = repos[CODESTRAL].sha256[shard]
    assert not (snap / shard).exists() and not (blobs / sha).exists() and _leftovers(snap) == []

    ok(mamba2("download", "codestral", env=env))
    assert hub.gets(shard)[-1].range is None  # huggingface_hub starts an interrupted file over
    assert (snap / shard).read_bytes() == data


def test_disk_full_midway_keeps_nothing_and_the_next_run_completes(hub, env, repos):
    size = len(repos["acme/tiny"].files["model.safetensors"])
    p = mamba2("download", "acme/tiny", env=env, limit_file_size=size // 2)
    fails(p, "disk full while writing model.safetensors", "run the same command again")
    snap = snapshot(env, "acme/tiny", repos)
    assert not (snap / "model.safetensors").exists() and _leftovers(snap) == []

    ok(mamba2("download", "acme/tiny", env=env))
    assert (snap / "model.safetensors").read_bytes() == repos["acme/tiny"].files["model.safetensors"]


@pytest.mark.parametrize("file, what", [("model.safetensors", "SHA-256"), ("tokenizer.json", "git blob id")])
def test_bytes_that_do_not_match_the_listing_are_refused(hub, env, repos, file, what):
    """LFS files are checked against their SHA-256, all others against their git blob id."""
    hub.corrupt.add(file)
    fails(mamba2("download", "acme/tiny", env=env), f"acme/tiny/{file}", f"do not match the Hub's {what}")
    snap = snapshot(env, "acme/tiny", repos)
    blobs = snap.parents[1] / "blobs"
    assert not (snap / file).exists() and _leftovers(snap) == []
    assert {p.name for p in blobs.iterdir()} & {repos["acme/tiny"].sha256.get(file), _blob_id(repos, file)} == set()

    hub.corrupt.clear()
    ok(mamba2("download", "acme/tiny", env=env))
    assert (snap / file).read_bytes() == repos["acme/tiny"].files[file]


def _blob_id(repos, file):
    from hub_server import git_blob_id

    return git_blob_id(repos["acme/tiny"].files[file])


@contextmanager
def _names_appearing(*dirs: Path):
    """The paths that appear in `dirs` (created, linked or renamed into them) while the block runs.

    Read from the kernel's inotify queue once the block is over, so a name that exists for a
    microsecond is listed as surely as one that stays; the directories are created first."""
    import ctypes
    import struct

    libc = ctypes.CDLL(None, use_errno=True)
    fd = libc.inotify_init1(os.O_NONBLOCK)
    assert fd >= 0, os.strerror(ctypes.get_errno())
    in_create, in_moved_to = 0x100, 0x80
    watches = {}
    for d in dirs:
        d.mkdir(parents=True, exist_ok=True)
        wd = libc.inotify_add_watch(fd, os.fsencode(d), in_create | in_moved_to)
        assert wd >= 0, os.strerror(ctypes.get_errno())
        watches[wd] = d
    seen: list[Path] = []
    try:
        yield seen
    finally:
        events = b""
        while True:
            try:
                events += os.read(fd, 1 << 16)
            except BlockingIOError:
                break
        os.close(fd)
        i = 0
        while i < len(events):
            wd, _mask, _cookie, n = struct.unpack_from("iIII", events, i)
            seen.append(watches[wd] / events[i + 16 : i + 16 + n].rstrip(b"\0").decode())
            i += 16 + n


@pytest.mark.skipif(sys.platform != "linux", reason="watches the directories with inotify")
@pytest.mark.parametrize("local_dir", [False, True])
@pytest.mark.parametrize("file", ["model.safetensors", "tokenizer.json"])
def test_a_corrupt_file_never_appears_under_its_real_name(hub, env, repos, tmp_path, file, local_dir):
    """Not even for the moment it takes to hash it: the bytes are checked before they are moved
    into place (the snapshot link and the blob, or the file of --local-dir)."""
    hub.corrupt.add(file)
    if local_dir:
        here = tmp_path / "here"
        watched, args = [here], ["--local-dir", str(here)]
    else:
        snap = snapshot(env, "acme/tiny", repos)
        watched, args = [snap, snap.parents[1] / "blobs"], []
    with _names_appearing(*watched) as seen:
        fails(mamba2("download", "acme/tiny", *args, env=env), f"acme/tiny/{file}", "do not match the Hub's")
    names = {p.name for p in seen}
    assert "config.json" in names  # the watch sees the files that are fine
    real = {file, repos["acme/tiny"].sha256.get(file) or _blob_id(repos, file)}
    assert not names & real, seen


def test_a_download_is_where_huggingface_hubs_cache_scan_and_lookup_find_it(hub, env, repos):
    from huggingface_hub import scan_cache_dir, try_to_load_from_cache

    ok(mamba2("download", "codestral", env=env))
    scan = scan_cache_dir(env["HF_HUB_CACHE"])
    assert scan.warnings == []
    (repo,) = scan.repos
    (rev,) = repo.revisions
    assert repo.repo_id == CODESTRAL and rev.commit_hash == repos[CODESTRAL].commit and rev.refs == {"main"}
    assert {f.file_name for f in rev.files} == HF_FILES
    assert rev.size_on_disk == sum(len(repos[CODESTRAL].files[f]) for f in HF_FILES)
    found = try_to_load_from_cache(CODESTRAL, "config.json", cache_dir=env["HF_HUB_CACHE"])
    assert found == str(snapshot(env, CODESTRAL, repos) / "config.json")


# ---------------------------------------------------------------------------------------
# A hostile endpoint


def _hostile_repos(repos) -> dict[str, Repo]:
    """Repos whose names and ids lead out of the cache: tmp/hf/hub/models--acme--x/{snapshots/<commit>,
    blobs}/... climbs to tmp/ in 5 / 4 steps, tmp/here/... in 1."""
    from hub_server import git_blob_id

    tiny = repos["acme/tiny"].files
    up5, up4 = "../../../../../elsewhere", "../../../../elsewhere"
    cod = dict(repos[CODESTRAL].files)
    index = json.loads(cod["model.safetensors.index.json"])
    first = next(iter(index["weight_map"]))
    index["weight_map"][first] = f"{up5}/model-00002-of-00002.safetensors"
    cod["model.safetensors.index.json"] = json.dumps(index).encode()
    cod[f"{up5}/model-00002-of-00002.safetensors"] = cod["model-00002-of-00002.safetensors"]
    return {
        "acme/name": Repo({**tiny, f"{up5}/x.json": b"{}", "../elsewhere/x.json": b"{}"}),
        "acme/shard": Repo(cod),
        "acme/commit": Repo(tiny, commit=f"{up4}/c"),
        "acme/etag": Repo(tiny, etag={"config.json": f"{up4}/e"}),
        "acme/lfs-etag": Repo(tiny, etag={"model.safetensors": f"{up4}/e"}),
        "acme/head-commit": Repo(tiny, head_commit=f"{up4}/h"),
        "acme/revision": Repo(tiny, branches={f"{up4}/r": ""}),
        "acme/backslash": Repo({**tiny, "..\\x.json": b"{}"}),
        # A real blob id, but config.json's: the snapshot's tokenizer.json would link to its blob.
        "acme/etag-swap": Repo(tiny, etag={"tokenizer.json": git_blob_id(tiny["config.json"])}),
    }


@pytest.mark.parametrize("args", [
    ["acme/name", "--include", "*"],
    ["acme/name", "--include", "*", "--local-dir", "{here}"],
    ["acme/shard"],
    ["acme/shard", "--local-dir", "{here}"],
    ["acme/commit"],
    ["acme/etag"],
    ["acme/etag", "--local-dir", "{here}"],
    ["acme/lfs-etag"],
    ["acme/head-commit"],
    ["acme/revision", "--revision", "../../../../elsewhere/r"],
    ["acme/backslash", "--include", "*"],
    ["acme/etag-swap"],
])
def test_names_from_a_hostile_endpoint_never_lead_outside(repos, env, tmp_path, args):
    server = HubServer(_hostile_repos(repos)).start()
    try:
        here = tmp_path / "here"
        p = mamba2("download", *[a.format(here=here) for a in args], env={**env, "HF_ENDPOINT": server.url})
    finally:
        server.stop()
    fails(p)
    written = [f for f in tmp_path.rglob("*") if not f.is_dir()]
    assert all(f.is_relative_to(tmp_path / "hf") or f.is_relative_to(here) for f in written), written
    assert not (tmp_path / "elsewhere").exists()


def test_a_server_that_sends_more_than_listed_is_stopped(hub, env, repos):
    hub.extra["model.safetensors"] = 100_000
    fails(mamba2("download", "acme/tiny", env=env), "acme/tiny/model.safetensors", "refusing the Hub's answer")
    snap = snapshot(env, "acme/tiny", repos)
    assert not (snap / "model.safetensors").exists() and _leftovers(snap) == []


def test_a_server_that_ignores_range_and_keeps_dropping_is_given_up(env, tmp_path):
    """Every retry brings bytes (so huggingface_hub's own retry count never runs out) but none
    beyond where the first attempt got: 5 such restarts end the download."""
    big = os.urandom(12_000_000)
    server = HubServer({"acme/big": Repo({"big.safetensors": big})}).start()
    server.drop_every["big.safetensors"] = 10_600_000  # past huggingface_hub's first 10 MB chunk
    try:
        p = mamba2("download", "acme/big", "--include", "*", env={**env, "HF_ENDPOINT": server.url})
    finally:
        server.stop()
    fails(p, "big.safetensors", "started over 6 times")
    assert 6 <= len(server.gets("big.safetensors")) <= 8


def test_not_enough_disk_space_gives_both_numbers_before_fetching_weights(hub, env, repos):
    from mamba2_cli.download import format_size

    files = repos[CODESTRAL].files
    needed = sum(len(files[f]) for f in HF_FILES) - len(files["config.json"]) - len(
        files["model.safetensors.index.json"])
    env["MAMBA2_FAKE_FREE_BYTES"] = "1000"
    fails(mamba2("download", "codestral", env=env), "not enough disk space", f"needs {format_size(needed)} more",
          f"{format_size(1000)} free")
    assert hub.files_fetched() == {"config.json", "model.safetensors.index.json"}


@pytest.mark.parametrize("args, words", [
    (["download", "acme/nope"], ["acme/nope: no such model", "hf auth login"]),
    (["download", "acme/gated"], ["acme/gated is gated", "/acme/gated", "hf auth login", "HF_TOKEN", "--token"]),
    (["download", "acme/gated", "--token", "hf_wrong"], ["acme/gated is gated"]),
    (["download", "acme/tiny", "--revision", "nope"], ["acme/tiny has no revision 'nope'"]),
    (["download", "acme/tiny@nope"], ["acme/tiny has no revision 'nope'"]),
    (["download", "acme/mistral-only"], ["tokenizer.model.v3", "no tokenizer.json"]),
    (["download", "acme/gpt2"], ["acme/gpt2 is not a model mamba2 can run", "gpt2"]),
    (["download", "tiny"], ["random-weight preset", "--preset tiny"]),
    (["download", "./x/y/z"], ["not an alias or a Hugging Face repo id"]),
])
def test_download_errors_are_one_line(hub, env, args, words):
    fails(mamba2(*args, env=env), *words)
    assert not hub.gets() or hub.files_fetched() <= {"config.json"}  # never the weights


def test_an_unknown_format_is_a_flag_error(hub, env):
    p = mamba2("download", CODESTRAL, "--format", "gguf", env=env)
    err = p.stderr.decode()
    assert p.returncode == 2 and "'gguf' is not one of" in err and "Traceback" not in err
    assert not hub.gets()


def test_gated_repo_downloads_with_a_token(hub, env, repos):
    ok(mamba2("download", "acme/gated", "--token", TOKEN, env=env))
    ok(mamba2("download", "acme/gated", env={**env, "HF_TOKEN": TOKEN}))
    resolves = [r for r in hub.log if "/resolve/" in r.path]
    assert resolves and all(r.authorization == f"Bearer {TOKEN}" for r in resolves)
    assert all(r.authorization is None for r in hub.log if r.path.startswith("/cdn/"))  # not sent off the Hub


def test_no_network_and_offline_mode(hub, env, repos):
    dead = {**env, "HF_ENDPOINT": "http://127.0.0.1:9"}
    fails(mamba2("download", "acme/tiny", env=dead), "cannot reach the Hub at http://127.0.0.1:9")
    offline = {**env, "HF_HUB_OFFLINE": "1"}
    fails(mamba2("download", "acme/tiny", env=offline), "offline mode is on")
    fails(mamba2("info", "acme/tiny", env=offline), "not in the Hugging Face cache", "mamba2 download acme/tiny")
    fails(mamba2("info", "acme/tiny", "--offline", env=env), "mamba2 download acme/tiny")
    fails(mamba2("bench", "-m", "acme/tiny", "--offline", env=env), "mamba2 download acme/tiny")
    assert hub.log == []


def test_xet_progress_adapter_follows_huggingface_hubs_reporter():
    """hf_xet transfers cannot be served here; at least the bar huggingface_hub drives for them
    must take its calls (the reporter is huggingface_hub's own, unpatched)."""
    import threading
    from types import SimpleNamespace

    from huggingface_hub.utils._xet_progress_reporting import XetDownloadProgressReporter

    from mamba2_cli.download import Progress, _bar_for

    class Counter(Progress):
        done = 0

        def advance(self, task, n):
            self.done += n

    progress = Counter()
    bars = _bar_for(progress, "x", 1000, threading.Event())
    with XetDownloadProgressReporter(reconstruction_desc="x", total=1000, log_level=30, tqdm_class=bars) as r:
        for written, received in ((300, 500), (1000, 900)):
            r.update_progress(SimpleNamespace(total_bytes_completed=written, total_transfer_bytes_completed=received,
                                              total_bytes_completion_rate=1.0, total_bytes=1000,
                                              total_transfer_bytes_completion_rate=1.0))
    assert progress.done == 1000


# ---------------------------------------------------------------------------------------
# Resolution, aliases, info, models


def test_aliases_and_presets_do_not_mix(hub, env):
    from mamba2_cli.hub import ALIASES, expand_alias, resolve_model_dir
    from mamba2_cli.config import preset_config
    from mamba2_cli.errors import Mamba2Error

    assert expand_alias("codestral") == CODESTRAL and expand_alias("mamba2-2.7b@abc") == "state-spaces/mamba2-2.7b@abc"
    assert set(ALIASES) == {"codestral", "mamba2-130m", "mamba2-370m", "mamba2-780m", "mamba2-1.3b", "mamba2-2.7b"}
    with pytest.raises(Mamba2Error, match="--preset codestral-7b"):
        resolve_model_dir("codestral-7b")
    with pytest.raises(Mamba2Error, match="-m codestral"):
        preset_config("codestral")


def test_info_and_models(hub, env, repos):
    from mamba2_cli.config import read_config
    from mamba2_cli.info import describe

    text = ok(mamba2("info", "codestral", "--batch-size", "4", env=env)).stdout.decode()  # downloads first
    snap = snapshot(env, CODESTRAL, repos)
    cfg = read_config(snap)
    assert "format      hf" in text and f"{cfg.num_parameters():,}" in text and "float32 (as stored)" in text
    d = describe(snap, batch_size=4)
    assert d["format"] == "hf" and d["parameters"] == cfg.num_parameters() and d["stored_dtype"] == "float32"
    st = d["state_per_sequence"]
    assert st["conv"] + st["ssm"] == cfg.state_bytes(1, 4)
    assert st["ssm"] == cfg.n_layer * cfg.nheads * cfg.headdim * cfg.d_state * 4
    assert d["memory"]["total"] == d["parameters"] * 4 + 4 * st["total"]
    assert describe(snap, dtype="bfloat16")["memory"]["weights"] == d["parameters"] * 2
    files = repos[CODESTRAL].files
    assert d["bytes_on_disk"] == sum(len(files[f]) for f in HF_FILES)

    ok(mamba2("download", "mamba2-130m", env=env))
    ssm = describe(snapshot(env, MAMBA2_130M, repos))  # pytorch_model.bin: dtype read through torch
    assert ssm["format"] == "mamba_ssm" and ssm["stored_dtype"] == "float32" and ssm["weight_files"] == [
        "pytorch_model.bin"]
    m = json.loads(ok(mamba2("models", "--json", env=env)).stdout)
    got = {c["repo_id"]: c for c in m["cached"]}
    assert set(got) == {CODESTRAL, MAMBA2_130M}  # not the tokenizer-only GPT-NeoX repo
    assert got[MAMBA2_130M]["format"] == "mamba_ssm" and got[MAMBA2_130M]["complete"]
    assert got[CODESTRAL]["size"] == d["bytes_on_disk"] and got[CODESTRAL]["refs"] == ["main"]
    assert {a["alias"]: a["cached"] for a in m["aliases"]} == {
        "codestral": True, "mamba2-130m": True, "mamba2-370m": False, "mamba2-780m": False, "mamba2-1.3b": False,
        "mamba2-2.7b": False}
    table = ok(mamba2("models", env=env)).stdout.decode()
    assert MAMBA2_130M in table and "mamba_ssm" in table and "complete" in table


def test_a_partial_snapshot_is_completed_on_run_and_named_when_offline(hub, env, repos):
    ok(mamba2("download", "acme/tiny", "--include", "*.json", env=env))
    offline = {**env, "HF_HUB_OFFLINE": "1"}
    fails(mamba2("info", "acme/tiny", env=offline), "only partly in the Hugging Face cache", "model.safetensors",
          "mamba2 download acme/tiny")
    d = json.loads(ok(mamba2("info", "acme/tiny@v1", "--json", env=env)).stdout)
    assert d["revision"] == repos["acme/tiny"].commit
    assert (snapshot(env, "acme/tiny", repos).parents[1] / "refs" / "v1").is_file()
    assert hub.files_fetched() == {"config.json", "tokenizer.json", "tokenizer_config.json", "model.safetensors"}
    assert len(hub.gets("config.json")) == 1
