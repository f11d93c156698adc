"""Checkpoint integrity: checksum manifests (dist_marsm.checkpoint_manifest) and the torchtitan manager that writes
and verifies them (dist_marsm.titan.checkpoint).

* Manifest functions in one process: CRC-32 against binascii's over the whole file at once (chunk boundaries);
  a flipped byte, a truncated and a missing file are each named; an unlisted file is ignored; no manifest is
  told apart from a failing one; a missing rank part is reported by rank, parts of a save with another rank
  count are refused; the newest verifying step is picked and a torn one (no ``.metadata``) never; the
  pre-launch check (train.check_resume) passes over a step whose ``.metadata`` fails.
* On 2 and 3 gloo ranks: each rank's part lists only its own file, all ranks get the same verdict whichever
  rank read the damaged file.
* The CPU recipe as a real job (2 ranks, slow): one byte flipped in the middle of step-6's ``__0_0.distcp``;
  the resume names the file and the step, loads step-4 and redoes steps 5 and 6 with the losses of the first
  run (bitwise: same ranks, deterministic gloo); control: the undamaged copy resumes from step-6. An explicit
  ``load_step`` of the damaged step stops every rank with the error; ``verify = false`` loads it; with
  ``async_mode = "async"`` every checkpoint still gets a manifest that verifies.
"""

from __future__ import annotations

import binascii
import os
import re
import shutil

import pytest

from dist_marsm import checkpoint_manifest as cm
from tests._spawn import scenario, scenario_cases, scenario_check
from tests._titan_jobs import loaded_from, losses, run_job


def _write(path: str, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)


def _flip_byte(path: str, offset: int | None = None) -> int:
    """Invert one byte (the middle one by default); returns its offset."""
    offset = os.path.getsize(path) // 2 if offset is None else offset
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0xFF]))
    return offset


def _fake_step(folder: str, step: int, ranks: int = 2, manifest: bool = True) -> str:
    """A DCP-like step folder: ``__<r>_0.distcp`` per rank (distinct contents), ``.metadata``, and each rank's
    part of the manifest (one process writes them all: the parts need no collective)."""
    step_dir = os.path.join(folder, f"step-{step}")
    os.makedirs(step_dir, exist_ok=True)
    for r in range(ranks):
        _write(os.path.join(step_dir, f"__{r}_0.distcp"), os.urandom(1000 + 17 * r))
    _write(os.path.join(step_dir, ".metadata"), os.urandom(300))
    if manifest:
        for r in range(ranks):
            cm.write_rank_manifest(step_dir, step, r, ranks)
    return step_dir


def _part(step_dir: str, rank: int) -> str:
    return os.path.join(step_dir, cm.MANIFEST_NAME, f"rank-{rank}.json")


# ----------------------------------------------------------------------------- one process
def test_file_crc32_matches_binascii_across_chunk_boundaries(tmp_path, monkeypatch):
    monkeypatch.setattr(cm, "_CHUNK_BYTES", 4096)
    data = os.urandom(4096 * 2 + 123)  # two full chunks and a partial one
    path = str(tmp_path / "blob")
    _write(path, data)
    assert cm.file_crc32(path) == {"size": len(data), "crc32": f"{binascii.crc32(data):08x}"}
    _write(path, b"")
    assert cm.file_crc32(path) == {"size": 0, "crc32": "00000000"}


def test_rank_parts_list_each_ranks_files_and_rank0_the_metadata(tmp_path):
    step_dir = _fake_step(str(tmp_path), 3, ranks=2, manifest=False)
    assert cm.read_manifest(step_dir) is None
    done = cm.write_rank_manifest(step_dir, 3, 1, 2)
    assert done["files"] == 1 and done["bytes"] == 1017
    files, unchecked = cm.read_manifest(step_dir)
    assert sorted(files) == ["__1_0.distcp"] and unchecked == [0]  # rank 0's part not written yet
    cm.write_rank_manifest(step_dir, 3, 0, 2)
    files, unchecked = cm.read_manifest(step_dir)
    assert sorted(files) == [".metadata", "__0_0.distcp", "__1_0.distcp"] and unchecked == []
    for name in files:
        with open(os.path.join(step_dir, name), "rb") as f:
            data = f.read()
        assert files[name] == {"size": len(data), "crc32": f"{binascii.crc32(data):08x}"}
    assert sorted(os.listdir(os.path.join(step_dir, cm.MANIFEST_NAME))) == ["rank-0.json", "rank-1.json"]


def test_rank0_drops_parts_of_an_earlier_save_with_more_ranks(tmp_path):
    step_dir = _fake_step(str(tmp_path), 3, ranks=3)
    os.remove(os.path.join(step_dir, "__2_0.distcp"))
    cm.write_rank_manifest(step_dir, 3, 1, 2)
    with pytest.raises(cm.CheckpointIntegrityError, match="different rank counts"):  # mid-overwrite: refused
        cm.read_manifest(step_dir)
    cm.write_rank_manifest(step_dir, 3, 0, 2)
    assert cm.read_manifest(step_dir)[1] == [] and not os.path.exists(_part(step_dir, 2))
    assert cm.verify(step_dir) == ([], [])


def test_verify_names_each_damaged_file_and_passes_the_undamaged_control(tmp_path):
    step_dir = _fake_step(str(tmp_path), 2)
    assert cm.verify(step_dir) == ([], [])  # control
    _write(os.path.join(step_dir, "__7_0.distcp"), b"left over from a save with more ranks")
    _write(os.path.join(step_dir, "notes.txt"), b"not DCP's")
    assert cm.verify(step_dir) == ([], [])  # files the manifest does not list are ignored
    _flip_byte(os.path.join(step_dir, "__1_0.distcp"))
    os.truncate(os.path.join(step_dir, ".metadata"), 299)
    os.remove(os.path.join(step_dir, "__0_0.distcp"))
    problems, unchecked = cm.verify(step_dir)
    assert len(problems) == 3 and unchecked == [], problems
    assert problems[0] == ".metadata: 299 bytes, the manifest says 300"
    assert problems[1] == "__0_0.distcp: missing"
    assert re.fullmatch(r"__1_0\.distcp: crc32 [0-9a-f]{8}, the manifest says [0-9a-f]{8}", problems[2])


def test_no_manifest_and_unreadable_manifest_are_told_apart(tmp_path):
    plain = _fake_step(str(tmp_path), 2, manifest=False)
    assert cm.verify(plain) is None and cm.metadata_intact(plain)
    broken = _fake_step(str(tmp_path), 4)
    _write(_part(broken, 1), b'{"format": 1, "files": ')
    problems, _ = cm.verify(broken)
    assert len(problems) == 1 and "unreadable manifest part" in problems[0] and "rank-1.json" in problems[0]
    assert not cm.metadata_intact(broken)


def test_metadata_intact_checks_only_metadata(tmp_path):
    step_dir = _fake_step(str(tmp_path), 2)
    _flip_byte(os.path.join(step_dir, "__0_0.distcp"))
    assert cm.metadata_intact(step_dir)  # data files are the ranks' job
    _flip_byte(os.path.join(step_dir, ".metadata"), 0)
    assert not cm.metadata_intact(step_dir)


def test_newest_verified_step_falls_back_and_skips_torn_saves(tmp_path):
    folder, log = str(tmp_path), []

    def record(level, message):
        log.append((level, message))

    for step in (2, 4, 6):
        _fake_step(folder, step)
    os.makedirs(os.path.join(folder, "step-8"))  # torn: data but no .metadata
    _write(os.path.join(folder, "step-8", "__0_0.distcp"), b"half")
    assert cm.complete_steps(folder) == [2, 4, 6]
    assert cm.newest_verified_step(folder, record) == 6 and log == []  # control
    _flip_byte(os.path.join(folder, "step-6", "__0_0.distcp"))
    assert cm.newest_verified_step(folder, record) == 4
    assert len(log) == 1 and log[0][0] == "error"
    assert "step 6" in log[0][1] and "__0_0.distcp: crc32" in log[0][1], log
    os.remove(_part(os.path.join(folder, "step-4"), 1))  # rank 1's job ended before its part was written
    log.clear()
    assert cm.newest_verified_step(folder, record) == 4
    assert [lvl for lvl, _ in log] == ["error", "warning"] and "ranks [1] wrote no checksums" in log[1][1]
    shutil.rmtree(os.path.join(folder, "step-4", cm.MANIFEST_NAME))  # a checkpoint from before manifests
    log.clear()
    assert cm.newest_verified_step(folder, record) == 4
    assert [lvl for lvl, _ in log] == ["error", "warning"] and "has no checksums" in log[1][1]
    _flip_byte(os.path.join(folder, "step-2", ".metadata"))
    shutil.rmtree(os.path.join(folder, "step-4"))
    with pytest.raises(cm.CheckpointIntegrityError, match=r"no checkpoint in .* verifies \(steps \[2, 6\]"):
        cm.newest_verified_step(folder, record)
    assert cm.newest_verified_step(str(tmp_path / "absent"), record) == -1


def test_check_resume_reads_the_newest_step_whose_metadata_verifies(tmp_path):
    """The pre-launch optimizer check reads the .metadata of the step the ranks would load: a step whose
    .metadata fails its manifest is passed over (not unpickled)."""
    from dist_marsm.titan.recipe import RecipeError, load_recipe
    from dist_marsm.train import check_resume
    from tests.test_titan_recipe import ROOT, _fake_checkpoint

    recipe = str(ROOT / "recipes/debug_cpu.toml")
    for step in (2, 4):
        _fake_checkpoint(tmp_path, step)
        cm.write_rank_manifest(str(tmp_path / "checkpoint" / f"step-{step}"), step, 0, 1)
    config = load_recipe(recipe, ["--dump_folder", str(tmp_path), "--optimizer.name", "AdamW"])
    with pytest.raises(RecipeError, match="step-4"):  # control: the newest
        check_resume(config, recipe)
    _flip_byte(str(tmp_path / "checkpoint" / "step-4" / ".metadata"))
    with pytest.raises(RecipeError, match="step-2"):
        check_resume(config, recipe)


# ----------------------------------------------------------------------------- 2 and 3 gloo ranks
def _shared_folder(world: int) -> str:
    return os.path.join(os.environ["DIST_MARSM_TEST_MANIFEST_DIR"], f"world{world}")


def _rank_bytes(rank: int, step: int) -> bytes:
    return bytes((rank * 31 + step * 7 + i) % 251 for i in range(5000 + 1000 * rank))


@scenario(2, 3)
def scenario_collective_manifest(rank: int, world: int) -> None:
    import torch.distributed as dist

    folder = _shared_folder(world)
    for step in (1, 2):
        step_dir = os.path.join(folder, f"step-{step}")
        if rank == 0:
            os.makedirs(step_dir, exist_ok=True)
            _write(os.path.join(step_dir, ".metadata"), b"metadata of step %d" % step)
        dist.barrier()
        _write(os.path.join(step_dir, f"__{rank}_0.distcp"), _rank_bytes(rank, step))
        dist.barrier()  # DCP's save returns on every rank only once all files and .metadata exist
        done = cm.write_rank_manifest(step_dir, step, rank, world)
        assert done["files"] == (2 if rank == 0 else 1), done  # its own data file (+ .metadata on rank 0)
        dist.barrier()
        expected = {
            f"__{r}_0.distcp": {
                "size": len(_rank_bytes(r, step)),
                "crc32": f"{binascii.crc32(_rank_bytes(r, step)):08x}",
            }
            for r in range(world)
        }
        metadata = b"metadata of step %d" % step
        expected[".metadata"] = {"size": len(metadata), "crc32": f"{binascii.crc32(metadata):08x}"}
        assert cm.read_manifest(step_dir) == (expected, [])
        assert cm.verify(step_dir) == ([], [])  # control
    dist.barrier()
    victim = os.path.join(folder, "step-2", f"__{world - 1}_0.distcp")
    if rank == world - 1:
        _flip_byte(victim)
    dist.barrier()
    problems, _ = cm.verify(os.path.join(folder, "step-2"))
    assert len(problems) == 1 and problems[0].startswith(f"__{world - 1}_0.distcp: crc32 "), problems
    log = []
    assert cm.newest_verified_step(folder, lambda level, message: log.append(message)) == 1
    assert len(log) == 1 and "step 2" in log[0] and f"__{world - 1}_0.distcp" in log[0], log


@pytest.fixture(scope="module")
def collective(tmp_path_factory):
    os.environ["DIST_MARSM_TEST_MANIFEST_DIR"] = str(tmp_path_factory.mktemp("manifest"))
    return scenario_check(__name__, timeout=180)


@pytest.mark.parametrize("world,name", scenario_cases(__name__))
def test_collective_manifest_and_verdict(collective, world, name):
    collective(world, name)


# ----------------------------------------------------------------------------- the CPU recipe, a real job
STEPS = ["--training.steps", "6", "--checkpoint.interval", "2"]


@pytest.fixture(scope="module")
def first_run(tmp_path_factory):
    dump = str(tmp_path_factory.mktemp("first"))
    rc, log = run_job(dump, 2, STEPS)
    assert rc == 0, log[-4000:]
    for step in (2, 4, 6):
        assert cm.verify(os.path.join(dump, "checkpoint", f"step-{step}")) == ([], []), step
    return dump, losses(dump)


def _copy(dump: str, tmp_path, name: str) -> str:
    target = str(tmp_path / name)
    shutil.copytree(os.path.join(dump, "checkpoint"), os.path.join(target, "checkpoint"))
    return target


@pytest.mark.slow
def test_resume_skips_a_flipped_byte_and_loads_the_previous_checkpoint(first_run, tmp_path):
    dump, first_losses = first_run
    damaged = _copy(dump, tmp_path, "damaged")
    _flip_byte(os.path.join(damaged, "checkpoint", "step-6", "__0_0.distcp"))
    rc, log = run_job(damaged, 2, ["--training.steps", "8", "--checkpoint.interval", "2"])
    assert rc == 0, log[-4000:]
    named = [line for line in log.splitlines() if "fails verification" in line]
    assert named and all("step 6" in line and "__0_0.distcp: crc32" in line for line in named), named
    loads = loaded_from(log)
    assert len(loads) == 2 and all(p.endswith("step-4") for p in loads), loads  # both ranks
    redone = losses(damaged)
    assert sorted(redone) == [5, 6, 7, 8]
    assert [redone[5], redone[6]] == [first_losses[5], first_losses[6]]  # the state of step 4, exactly
    assert cm.verify(os.path.join(damaged, "checkpoint", "step-6")) == ([], [])  # saved again, a new manifest


@pytest.mark.slow
def test_resume_control_undamaged_loads_the_newest(first_run, tmp_path):
    dump, _ = first_run
    control = _copy(dump, tmp_path, "control")
    rc, log = run_job(control, 2, ["--training.steps", "7", "--checkpoint.interval", "2"])
    assert rc == 0, log[-4000:]
    assert "fails verification" not in log and "has no checksums" not in log and "wrote no checksums" not in log
    loads = loaded_from(log)
    assert len(loads) == 2 and all(p.endswith("step-6") for p in loads), loads
    assert sorted(losses(control)) == [7]


@pytest.mark.slow
def test_load_step_of_a_damaged_checkpoint_stops_every_rank(first_run, tmp_path):
    dump, _ = first_run
    damaged = _copy(dump, tmp_path, "damaged")
    _flip_byte(os.path.join(damaged, "checkpoint", "step-4", "__1_0.distcp"))
    rc, log = run_job(damaged, 2, ["--training.steps", "8", "--checkpoint.load_step", "4"], timeout=300)
    assert rc != 0
    errors = [line for line in log.splitlines() if "CheckpointIntegrityError: checkpoint step 4" in line]
    assert len(errors) >= 2 and all("__1_0.distcp: crc32" in line for line in errors), log[-4000:]
    assert not loaded_from(log)


@pytest.mark.slow
def test_verify_false_loads_the_damaged_checkpoint(first_run, tmp_path):
    dump, _ = first_run
    damaged = _copy(dump, tmp_path, "unverified")
    _flip_byte(os.path.join(damaged, "checkpoint", "step-6", "__0_0.distcp"))
    rc, log = run_job(damaged, 2, ["--training.steps", "7", "--checkpoint.verify", "false"])
    assert rc == 0, log[-4000:]
    loads = loaded_from(log)
    assert len(loads) == 2 and all(p.endswith("step-6") for p in loads), loads
    assert "without checksums" in log
    assert not os.path.exists(os.path.join(damaged, "checkpoint", "step-7", cm.MANIFEST_NAME))


@pytest.mark.slow
def test_async_save_gets_its_manifest_once_the_save_is_waited_for(tmp_path):
    dump = str(tmp_path / "async")
    rc, log = run_job(dump, 2, STEPS + ["--checkpoint.async_mode", "async"])
    assert rc == 0, log[-4000:]
    for step in (2, 4, 6):  # 2 and 4 asynchronous (manifest at the next save's wait), 6 the final, synchronous
        step_dir = os.path.join(dump, "checkpoint", f"step-{step}")
        assert cm.verify(step_dir) == ([], []), step
    assert len(re.findall(r"crc32 of \d+ files? \(", log)) == 6, log[-4000:]  # 3 saves x 2 ranks
