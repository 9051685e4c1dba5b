"""Several MPI ranks as subprocesses (``mpiexec -n 2``): the data-parallel contract end to end.

Each test starts one job with a timeout; the worker scripts in workers/ assert on
every rank, and a failing assertion aborts the job, so a failure shows as a non-zero
exit with the traceback in stderr.
"""
import json
import time

import numpy as np
import pytest

from tests.distributed.mpi import WORKERS, explain, requires_mpi, run_ranks

pytestmark = requires_mpi


# cpu: the same in float64 on the Numba kernels (slow only when their float64 versions are not
# compiled and cached yet; the numpy run covers the distributed code, the CLI test the cpu backend).
@pytest.mark.parametrize("backend_name", ["numpy", pytest.param("cpu", marks=pytest.mark.slow)])
def test_two_ranks_train_exactly_as_one_process_with_the_global_batch(backend_name):
    """SGD+momentum and AdamW, 4 steps, float64: parameters within 1e-6 with SyncBatchNorm2d,
    NOT with local batch norm; replicas bitwise equal; sharded evaluation; SyncBatchNorm2d
    against BatchNorm2d on the concatenated batch (see workers/contract.py)."""
    proc = run_ranks(2, [f"{WORKERS}/contract.py", backend_name], timeout=300)
    assert proc.returncode == 0, explain(proc)
    for line in ("contract sgd sync-bn", "contract sgd local-bn", "contract adamw sync-bn", "contract adamw local-bn",
                 "evaluate sharded", "sync-batch-norm vs batch-norm"):
        assert line in proc.stdout, explain(proc)
    assert proc.stdout.count(" ok") == 6, explain(proc)  # rank 0 alone prints


@pytest.mark.parametrize("runner", [False, True], ids=["excepthook", "python-m-mpi4py"])
def test_a_rank_that_raises_ends_the_job_within_seconds(runner, tmp_path):
    """Rank 1 raises while rank 0 waits in a barrier: both must end, non-zero, well before the timeout.

    ``runner=False`` is a plain ``python script.py`` (what the ``minseg`` script is):
    only minseg's excepthook stands between it and a hang. That rank 1 got to its ``raise`` is read
    from the file it writes just before: the job's stderr is no witness, since MPI_Abort can end the
    ranks before mpiexec has forwarded the traceback they printed (a CI run got an empty stderr)."""
    failure = tmp_path / "failure.txt"
    start = time.monotonic()
    proc = run_ranks(2, [f"{WORKERS}/fail_on_rank1.py"], timeout=60, mpi4py_runner=runner, MINSEG_TEST_FAILURE_FILE=str(failure))
    elapsed = time.monotonic() - start
    assert proc.returncode != 0, explain(proc)
    # A hang runs into the 60 s timeout; a working abort ends in ~4 s on a quiet machine (two Python
    # start-ups and imports, then distributed.fail's 2 s wait for the other rank to fail too), which a
    # loaded CI machine can stretch several times over.
    assert elapsed < 30, f"the job took {elapsed:.1f} s to end after rank 1 raised\n{explain(proc)}"
    assert failure.read_text() == "rank 1 fails on purpose", explain(proc)


CLI_ARGS = ["--epochs", "2", "--num-images", "8", "--val-images", "6", "--size", "16", "--base-channels", "4",
            "--depth", "1", "--batch-size", "4", "--lr", "0.02", "--quiet"]


def test_cli_on_two_ranks_matches_the_single_process_run(tmp_path):
    """``mpiexec -n 2 python -m minseg train`` (cpu backend): last.npz and the validation metrics
    equal those of one process with the same global batch; only rank 0 prints and writes."""
    import subprocess
    import sys

    from tests.distributed.mpi import ROOT, rank_env

    args = ["-m", "minseg", "train", "--backend", "cpu", *CLI_ARGS]
    # The single-process run first: it also fills Numba's cache for the two ranks.
    single = subprocess.run([sys.executable, *args, "--out", str(tmp_path / "one")], cwd=ROOT, env=rank_env(),
                            capture_output=True, text=True, timeout=300)
    assert single.returncode == 0, explain(single)
    proc = run_ranks(2, args + ["--out", str(tmp_path / "two")], timeout=120, mpi4py_runner=False)
    assert proc.returncode == 0, explain(proc)
    assert proc.stdout.count("data-parallel over 2 ranks (MPI)") == 1, explain(proc)
    assert proc.stdout.count("finished in") == 1, explain(proc)
    with np.load(tmp_path / "one" / "last.npz") as a, np.load(tmp_path / "two" / "last.npz") as b:
        assert a.files == b.files
        for key in a.files:
            if key == "meta":
                continue
            # float32 training, the same sums in another order (per rank, then across ranks):
            # rounding differences ~1e-7 relative per step; 8 Adam steps stay well inside 1e-4.
            np.testing.assert_allclose(b[key], a[key], rtol=1e-4, atol=1e-5, err_msg=key)
        assert json.loads(str(a["meta"]))["schedule"] == json.loads(str(b["meta"]))["schedule"]
    one = json.loads((tmp_path / "one" / "history.json").read_text())
    two = json.loads((tmp_path / "two" / "history.json").read_text())
    for h1, h2 in zip(one, two, strict=True):
        assert h1["val_mIoU"] == pytest.approx(h2["val_mIoU"], abs=1e-6)
        for key in ("train_loss", "val_loss"):
            assert h1[key] == pytest.approx(h2[key], rel=1e-5), key
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == sorted(p.name for p in (tmp_path / "one").iterdir())


def test_cli_rejects_a_global_batch_the_ranks_cannot_share(tmp_path):
    # argparse keeps the last --batch-size: 3 replaces CLI_ARGS' 4
    proc = run_ranks(2, ["-m", "minseg", "train", "--backend", "numpy", *CLI_ARGS, "--batch-size", "3",
                         "--out", str(tmp_path)], timeout=60, mpi4py_runner=False)
    assert proc.returncode == 2, explain(proc)
    # Every rank fails at the same line, so they exit normally (distributed.fail): an MPI_Abort
    # could end the job before mpiexec forwarded the message (a CI run got an empty stderr).
    assert proc.stderr.count("--batch-size 3 is the global batch; it must be divisible by the 2 ranks") == 2, explain(proc)
    assert "MPI_Abort" not in proc.stderr and proc.stdout == "data-parallel over 2 ranks (MPI)\n", explain(proc)


def test_resume_at_another_world_size_continues_the_same_run(tmp_path):
    """Epoch 1 on 1 process then epoch 2 resumed on 2 ranks == epoch 1 on 2 ranks then epoch 2 on 1 process.

    Both runs stop after epoch 1 and resume with --epochs 2 (which stretches the learning-rate
    schedule the same way in both), so only the world sizes differ."""
    import subprocess
    import sys

    from tests.distributed.mpi import ROOT, rank_env

    args = ["-m", "minseg", "train", "--backend", "numpy", *CLI_ARGS]

    def run(ranks, *extra):
        if ranks == 1:
            proc = subprocess.run([sys.executable, *args, *extra], cwd=ROOT, env=rank_env(), capture_output=True,
                                  text=True, timeout=120)
        else:
            proc = run_ranks(2, args + list(extra), timeout=120, mpi4py_runner=False)
        assert proc.returncode == 0, explain(proc)
        return proc.stdout

    for first, second, out in ((1, 2, tmp_path / "a"), (2, 1, tmp_path / "b")):
        run(first, "--epochs", "1", "--out", str(out))
        assert "resuming from" in run(second, "--epochs", "2", "--resume", "--out", str(out))
    with np.load(tmp_path / "a" / "last.npz") as a, np.load(tmp_path / "b" / "last.npz") as b:
        for key in a.files:
            if key != "meta":  # float32, other summation orders (see the CLI test above)
                np.testing.assert_allclose(b[key], a[key], rtol=1e-4, atol=1e-5, err_msg=key)
        assert json.loads(str(a["meta"]))["schedule"] == json.loads(str(b["meta"]))["schedule"]
    # `minseg eval` over 2 ranks (sharded, summed) prints what one process prints, after its banner.
    eval_args = ["-m", "minseg", "eval", "--backend", "numpy", "--quiet", "--checkpoint", str(tmp_path / "a" / "last.npz")]
    one = subprocess.run([sys.executable, *eval_args], cwd=ROOT, env=rank_env(), capture_output=True, text=True, timeout=60)
    two = run_ranks(2, eval_args, timeout=60)
    assert one.returncode == 0 and two.returncode == 0, explain(one) + explain(two)
    assert two.stdout == "data-parallel over 2 ranks (MPI)\n" + one.stdout


def test_cli_error_on_one_rank_ends_every_rank(tmp_path):
    """Rank 1 alone fails (a missing dataset folder) after joining the world, while rank 0 trains
    on: minseg's main() must abort the job instead of leaving rank 0 in a collective."""
    import subprocess
    import sys

    from tests.distributed.mpi import MPIEXEC, ROOT, rank_env

    def rank_cmd(dataset):
        return ["-n", "1", sys.executable, "-m", "minseg", "train", "--backend", "numpy", *CLI_ARGS,
                "--dataset", dataset, "--out", str(tmp_path)]

    start = time.monotonic()
    proc = subprocess.run([MPIEXEC, *rank_cmd("synthetic"), ":", *rank_cmd(str(tmp_path / "missing"))], cwd=ROOT,
                          env=rank_env(), capture_output=True, text=True, timeout=60)
    elapsed = time.monotonic() - start
    assert proc.returncode != 0, explain(proc)
    assert "is neither 'synthetic'" in proc.stderr, explain(proc)
    assert elapsed < 15, f"the job took {elapsed:.1f} s to end\n{explain(proc)}"
