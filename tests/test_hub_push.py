"""``surgery push`` and ``--push-to`` through the real ``huggingface_hub`` client against a loopback
Hub (tests/hub_server.py): several commits, resumed after an interrupted one without sending again
what the remote has; branches and pull requests; the token used but never shown."""
from __future__ import annotations

import hashlib
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

import surgery
from surgery.hub import PushError
from _support import read_folder
from hub_server import use_hub

TOKEN = "hf_SecretPushTokenNeverPrinted4242XYZ"
# huggingface_hub's own LFS upload passes a file object as ``data=``, which httpx2 deprecates
pytestmark = pytest.mark.filterwarnings("ignore:Use 'content=<...>':DeprecationWarning")


@pytest.fixture
def hub(server, tmp_path, monkeypatch):
    """A fresh loopback Hub that wants TOKEN for writes; the client finds TOKEN in HF_TOKEN."""
    state = server.reset(token=TOKEN)
    state.cache = use_hub(monkeypatch, tmp_path, server.url, token=TOKEN)
    state.url = server.url
    return state


def app():
    from surgery_cli.app import app as surgery_app

    return surgery_app


def local_files(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_interrupted_multi_commit_push_resumes(hub, llama, tmp_path, caplog):
    folder = shutil.copytree(llama.base, tmp_path / "model")
    files = local_files(folder)
    shards = sorted(n for n in files if n.endswith(".safetensors"))
    assert len(shards) == 5
    caplog.set_level(logging.DEBUG)
    hub.fail_commit_at = 3  # the third commit request fails: two batches land
    with pytest.raises(PushError) as e:
        surgery.push(folder, "me/model", commit_size="100KB")
    message = str(e.value)
    assert "after 2 of 6 commits" in message and f"surgery push {folder} me/model" in message and "\n" not in message
    assert TOKEN not in message and "***" in message  # the server echoed the credential: it is hidden
    assert f"Bearer {TOKEN}" in hub.authorizations  # ... yet it was what the client sent
    landed = hub.files("me/model")
    assert set(landed) == {".gitattributes", *shards[:2]}  # weights first, one commit per ~100KB
    assert set(hub.uploaded) == {sha(files[n]) for n in shards[:3]}  # the third was uploaded before its commit failed

    hub.fail_commit_at = None
    result = surgery.push(folder, "me/model", commit_size="100KB")
    assert result.skipped == shards[:2] and len(result.commits) == 4
    assert result.uploaded[:3] == shards[2:] and result.uploaded[-1] in ("README.md", "model.safetensors.index.json")
    for n in shards:  # every shard's bytes crossed the wire exactly once, over both runs
        assert hub.uploaded[sha(files[n])] == len(files[n]), n
    remote = hub.files("me/model")
    assert {k: v for k, v in remote.items() if k != ".gitattributes"} == files
    # the index came last: no commit ever named shards the branch lacked
    paths_per_commit = [paths for repo, _, paths in hub.commits if repo == "me/model"]
    assert "model.safetensors.index.json" in paths_per_commit[-1]
    assert all(n.endswith(".safetensors") for c in paths_per_commit[:-1] for n in c)
    assert not list((tmp_path / "surgery-cache" / "push").glob("*.json"))  # progress dropped when done
    assert TOKEN not in caplog.text

    again = surgery.push(folder, "me/model", commit_size="100KB")
    assert not again.commits and len(again.skipped) == len(files)

    # and it pulls back as it was pushed
    ckpt = surgery.open_checkpoint("me/model")
    assert set(ckpt.tensors) == set(read_folder(folder))
    assert not hub.unhandled, hub.unhandled


def test_cli_push_never_shows_the_token(hub, llama, tmp_path):
    """The installed CLI in a real process, hub logging at debug, the server echoing the credential."""
    folder = shutil.copytree(llama.base, tmp_path / "model")
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env.update({k: os.environ[k] for k in os.environ if k.startswith("HF_")})  # as use_hub set them
    env.update(HF_HUB_VERBOSITY="debug", HF_TOKEN=TOKEN, COLUMNS="200")
    script = Path(sys.executable).parent / "surgery"
    hub.fail_commit_at = 1
    cmd = [str(script), "push", str(folder), "me/secret", "--private", "--commit-size", "200KB"]
    first = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert first.returncode == 1, first.stderr
    errors = [line for line in first.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "me/secret" in errors[0] and "surgery push" in errors[0], first.stderr
    second = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert second.returncode == 0, second.stderr
    assert "pushed" in second.stdout and "me/secret" in second.stdout
    for stream in (first.stdout, first.stderr, second.stdout, second.stderr):
        assert TOKEN not in stream and TOKEN[3:20] not in stream
    assert hub.repos["me/secret"].private
    assert {k: v for k, v in hub.files("me/secret").items() if k != ".gitattributes"} == local_files(folder)

    # a wrong token: refused by the server, and still not printed
    env["HF_TOKEN"] = "hf_WrongTokenAlsoSecret987654321"
    bad = subprocess.run(cmd[:3] + ["me/other"], env=env, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 1 and "401" in bad.stderr and "hf_WrongTokenAlsoSecret" not in bad.stderr + bad.stdout


def test_push_to_after_a_soup(hub, llama, tmp_path, capfd):
    out = tmp_path / "soup"
    r = CliRunner().invoke(app(), ["soup", str(llama.base), str(llama.v1), "-o", str(out), "--push-to", "me/soup"])
    assert r.exit_code == 0, r.output
    assert f"wrote {out}" in r.output and "pushed" in r.output and "me/soup" in r.output
    assert {k: v for k, v in hub.files("me/soup").items() if k != ".gitattributes"} == local_files(out)
    assert "surgery" in hub.files("me/soup")["README.md"].decode()
    captured = capfd.readouterr()
    assert TOKEN not in r.output + captured.out + captured.err

    # no token: refused before any work, nothing written, nothing sent
    os.environ.pop("HF_TOKEN")
    requests = len(hub.requests)
    r = CliRunner().invoke(app(), ["soup", str(llama.base), str(llama.v1), "-o", str(tmp_path / "x"),
                                   "--push-to", "me/soup2"])
    assert r.exit_code == 1 and "token" in r.output and not (tmp_path / "x").exists(), r.output
    r = CliRunner().invoke(app(), ["merge", str(llama.v1), "--base", str(llama.base), "--lines", "--dry-run",
                                   "--push-to", "me/x"])
    assert r.exit_code == 1 and "--dry-run" in r.output
    r = CliRunner().invoke(app(), ["soup", str(llama.base), "-o", str(tmp_path / "y"), "--push-to", "not a repo"])
    assert r.exit_code == 1 and "not a Hub repo id" in r.output and not (tmp_path / "y").exists()
    assert len(hub.requests) == requests

    # the token `hf auth login` stores is found as huggingface_hub finds it
    from huggingface_hub import constants

    Path(constants.HF_TOKEN_PATH).write_text(TOKEN)
    r = CliRunner().invoke(app(), ["push", str(out), "me/stored", "-q"])
    assert r.exit_code == 0 and "me/stored" in r.output and TOKEN not in r.output, r.output
    assert hub.authorizations[-1] == f"Bearer {TOKEN}" and "README.md" in hub.files("me/stored")


def test_branch_and_pull_request(hub, llama, tmp_path):
    folder = shutil.copytree(llama.base, tmp_path / "model")
    files = local_files(folder)
    main = hub.add_repo("me/repo", files={"README.md": b"# the original\n"})
    result = surgery.push(folder, "me/repo", revision="dev", commit_message="Soup v2")
    assert result.revision == "dev" and hub.repos["me/repo"].refs["main"] == main
    assert {k: v for k, v in hub.files("me/repo", "dev").items() if k != ".gitattributes"} == \
        {**files, "README.md": b"# the original\n"}  # the branch started from main; nothing is deleted

    def ctrl_c(message):  # Ctrl-C right after the pull request's first commit
        if "committed part 1" in message:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        surgery.push(folder, "me/repo", create_pr=True, commit_size="150KB", log=ctrl_c)
    assert hub.repos["me/repo"].prs == 1 and len(hub.files("me/repo", "refs/pr/1")) == 3
    result = surgery.push(folder, "me/repo", create_pr=True, commit_size="150KB")
    assert result.revision == "refs/pr/1" and result.pr_url.endswith("/me/repo/discussions/1")
    assert hub.repos["me/repo"].prs == 1  # the rerun went on in the pull request the first run opened
    assert {k: v for k, v in hub.files("me/repo", "refs/pr/1").items() if k not in (".gitattributes", "README.md")} == files
    assert hub.files("me/repo")["README.md"] == b"# the original\n"  # main untouched
    with pytest.raises(PushError, match="--create-pr"):
        surgery.push(folder, "me/repo", create_pr=True, revision="dev")


def test_only_complete_folders_are_pushed(hub, llama, tmp_path):
    folder = shutil.copytree(llama.base, tmp_path / "model")
    (folder / "model-00002-of-00005.safetensors").unlink()
    with pytest.raises(PushError, match="not a complete checkpoint.*model-00002-of-00005"):
        surgery.push(folder, "me/broken")
    partial = shutil.copytree(llama.base, tmp_path / ".model.surgery-1-abc.partial")
    with pytest.raises(PushError, match="unfinished"):
        surgery.push(partial, "me/broken")
    truncated = shutil.copytree(llama.base, tmp_path / "truncated")
    shard = truncated / "model-00003-of-00005.safetensors"
    shard.write_bytes(shard.read_bytes()[:-4])
    with pytest.raises(PushError, match="truncated"):
        surgery.push(truncated, "me/broken")
    with pytest.raises(PushError, match="not a Hub repo id"):
        surgery.push(llama.base, "me/broken@dev")
    assert not hub.requests  # refused before anything was sent


def test_single_file_outputs_are_pushed_whole(hub, llama, tmp_path):
    """An SFT file goes up under its own name, by `sft extract --push-to` and by `surgery push FILE`;
    a truncated one is refused before anything is sent."""
    sft = tmp_path / "task.sft.safetensors"
    r = CliRunner().invoke(app(), ["sft", "extract", "--base", str(llama.base), "--ft", str(llama.v1), "-o", str(sft),
                                   "--density", "0.05", "-q", "--push-to", "me/sft"])
    assert r.exit_code == 0, r.output
    assert {k: v for k, v in hub.files("me/sft").items() if k != ".gitattributes"} == {sft.name: sft.read_bytes()}
    assert surgery.push(sft, "me/sft").skipped == [sft.name]  # already there, bytes and all

    r = CliRunner().invoke(app(), ["push", str(sft), "me/sft2", "-q"])
    assert r.exit_code == 0 and hub.files("me/sft2")[sft.name] == sft.read_bytes(), r.output
    broken = tmp_path / "broken.sft.safetensors"
    broken.write_bytes(sft.read_bytes()[:-3])
    requests = len(hub.requests)
    with pytest.raises(PushError, match="not a complete safetensors file.*broken"):
        surgery.push(broken, "me/broken")
    assert len(hub.requests) == requests
