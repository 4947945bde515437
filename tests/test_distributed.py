"""Several processes give the results of one: DistributedContext on its own (one process, and a real
one-rank gloo group), then `softtool train` / `softtool eval` under torchrun with 2 gloo ranks on the
tiny random Llama compared with a single process on the same global batch."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from safetensors.torch import load_file

from softtool.distributed import DistributedContext, DistributedOptions, distributed_context, resolve_device
from softtool.errors import SofttoolError
from softtool.training.checkpoint import load_checkpoint

LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "LOCAL_WORLD_SIZE")
# Summing per-rank gradients reorders float additions; over a few Adam steps that moves the prompt by
# a few float32 ulps. 1e-5 relative is far above that noise and far below any real difference.
RTOL = 1e-5


needs_two_cores = pytest.mark.skipif(
    (os.cpu_count() or 1) < 2, reason="needs 2 CPU cores to run 2 gloo ranks side by side"
)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def no_launcher(monkeypatch):
    for name in LAUNCH_VARS:
        monkeypatch.delenv(name, raising=False)


# -- one process ---------------------------------------------------------------------------------------


def test_single_process_context_initialises_nothing_and_passes_values_through(no_launcher):
    module = torch.nn.Linear(2, 2)
    with distributed_context("cpu") as ctx:
        assert not ctx.is_distributed and ctx.is_main and ctx.world_size == 1
        assert not torch.distributed.is_initialized()
        assert ctx.device == torch.device("cpu")
        assert ctx.shard_indices([4, 1, 3]) == [4, 1, 3]
        assert list(ctx.strided(3)) == [0, 1, 2]
        assert ctx.all_reduce_sum(2.5) == 2.5
        assert ctx.any(False) is False and ctx.any(True) is True
        assert ctx.gather_objects({"a": 1}) == [{"a": 1}]
        assert ctx.broadcast_object("x") == "x"
        assert ctx.wrap_prompt(module) is module
        assert ctx.gather_in_order([(1, "b"), (0, "a")], 2) == ["a", "b"]
    assert not torch.distributed.is_initialized()


@given(n=st.integers(0, 40), world=st.integers(1, 7))
def test_shards_of_a_global_batch_concatenate_to_it_in_rank_order(n, world):
    batch = list(range(100, 100 + n))
    shards = [DistributedContext(rank=r, world_size=world).shard_indices(batch) for r in range(world)]
    assert [i for shard in shards for i in shard] == batch
    assert max(map(len, shards)) - min(map(len, shards)) <= 1


@given(n=st.integers(0, 30), world=st.integers(1, 5))
def test_strided_work_units_are_each_done_by_exactly_one_rank(n, world):
    done = sorted(i for r in range(world) for i in DistributedContext(rank=r, world_size=world).strided(n))
    assert done == list(range(n))


def test_gather_in_order_refuses_an_item_no_rank_computed(no_launcher):
    with pytest.raises(RuntimeError, match="no rank"):
        DistributedContext().gather_in_order([(0, "a")], 2)


def test_options_refuse_bad_combinations():
    with pytest.raises(ValueError, match="backend"):
        DistributedOptions(backend="mpi")
    with pytest.raises(ValueError, match="exclude"):
        DistributedOptions(device_map="auto", fsdp=True)
    with pytest.raises(ValueError, match="timeout"):
        DistributedOptions(timeout_s=0)


@pytest.mark.parametrize(
    ("env", "options", "message"),
    [
        ({"RANK": "2", "WORLD_SIZE": "2"}, None, "outside"),
        ({"RANK": "0", "WORLD_SIZE": "two"}, None, "not an integer"),
        ({"RANK": "0", "WORLD_SIZE": "2"}, DistributedOptions(device_map="auto"), "device-map"),
        ({"RANK": "0", "WORLD_SIZE": "2"}, None, "MASTER_ADDR"),
        (
            {"RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "1"},
            DistributedOptions(backend="nccl"),
            "nccl",
        ),
    ],
)
def test_bad_launcher_environment_is_a_user_error(no_launcher, monkeypatch, env, options, message):
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(SofttoolError, match=message):
        DistributedContext.from_env("cpu", options)
    assert not torch.distributed.is_initialized()


def test_auto_device_is_cpu_without_cuda_and_cuda_is_refused():
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    assert resolve_device("auto") == torch.device("cpu")
    with pytest.raises(SofttoolError, match="CUDA is not available"):
        resolve_device("cuda", 1, 2, launched=True)


def test_one_rank_gloo_group_sums_prompt_gradients_and_is_destroyed_on_exit(no_launcher, monkeypatch):
    for key, value in {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1"}.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("MASTER_PORT", str(free_port()))
    torch.manual_seed(0)
    plain = torch.nn.Linear(3, 2)
    copy = torch.nn.Linear(3, 2)
    copy.load_state_dict(plain.state_dict())
    x = torch.randn(4, 3)
    plain(x).square().sum().backward()
    with distributed_context("cpu") as ctx:
        assert ctx.is_distributed and ctx.backend == "gloo" and ctx.is_main
        wrapped = ctx.wrap_prompt(copy)
        assert isinstance(wrapped, torch.nn.parallel.DistributedDataParallel)
        wrapped(x).square().sum().backward()
        torch.testing.assert_close(copy.weight.grad, plain.weight.grad, rtol=0, atol=0)
        assert ctx.all_reduce_sum(7.0) == 7.0
        assert ctx.gather_in_order([(1, "b"), (0, "a")], 2) == ["a", "b"]
        with pytest.raises(SofttoolError, match="on main"):
            ctx.on_main(_raise_user_error)
        ctx.barrier()
    assert not torch.distributed.is_initialized()


def _raise_user_error():
    raise SofttoolError("failed on main")


# -- several processes ---------------------------------------------------------------------------------

EN = [
    "A man rides a bike.",
    "Two dogs play in the snow.",
    "A woman is reading a book.",
    "Children are running on the beach.",
    "A cat sleeps on the sofa.",
    "The boy kicks a red ball.",
    "People are waiting for the bus.",
    "A girl paints a picture.",
    "An old man sits on a bench.",
    "Two friends drink coffee.",
    "A dog jumps over a fence.",
    "The chef cooks in the kitchen.",
    "A band plays music on stage.",
]
DE = [
    "Ein Mann fährt Fahrrad.",
    "Zwei Hunde spielen im Schnee.",
    "Eine Frau liest ein Buch.",
    "Kinder laufen am Strand.",
    "Eine Katze schläft auf dem Sofa.",
    "Der Junge schießt einen roten Ball.",
    "Leute warten auf den Bus.",
    "Ein Mädchen malt ein Bild.",
    "Ein alter Mann sitzt auf einer Bank.",
    "Zwei Freunde trinken Kaffee.",
    "Ein Hund springt über einen Zaun.",
    "Der Koch kocht in der Küche.",
    "Eine Band spielt Musik auf der Bühne.",
]


@pytest.fixture(scope="module")
def parallel_data(tmp_path_factory) -> Path:
    """11 training pairs (global batch 5: the epoch's last batch has 1 example, so one rank gets none)."""
    folder = tmp_path_factory.mktemp("mini-multi30k")
    for split, rows in (("train", slice(0, 11)), ("dev", slice(6, 13))):
        (folder / f"{split}.en").write_text("\n".join(EN[rows]) + "\n")
        (folder / f"{split}.de").write_text("\n".join(DE[rows]) + "\n")
    return folder


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARS}
    # One thread per process on the 2-core machine; the reference run uses the same.
    env.update(OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", PYTHONWARNINGS="ignore")
    return env


def _softtool(args: list[str], nproc: int = 0, timeout: float = 120) -> tuple[str, str]:
    if nproc:
        launcher = [
            sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
            "--master_addr=127.0.0.1", f"--master_port={free_port()}", "-m", "softtool",
        ]  # fmt: skip
    else:
        launcher = [sys.executable, "-m", "softtool"]
    proc = subprocess.Popen(launcher + args, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    finally:
        _kill_tree(proc)
    assert proc.returncode == 0, f"exit {proc.returncode}\n{stdout[-3000:]}\n{stderr[-5000:]}"
    return stdout, stderr


def _kill_tree(proc: subprocess.Popen) -> None:
    """torchrun starts each worker in its own session, so a hung run's workers outlive torchrun: end them too."""
    import psutil

    if proc.poll() is not None:
        return
    for child in psutil.Process(proc.pid).children(recursive=True):
        child.kill()
    proc.kill()
    proc.wait()


# One run's options, as CLI flags for the torchrun runs and as API objects for the in-process reference.
PROMPT = {"num_virtual_tokens": 4, "init": "random"}
TRAIN = {
    "max_steps": 5, "batch_size": 5, "grad_accumulation": 2, "warmup_steps": 1, "lr": 0.3, "eval_every": 0,
    "eval_limit": 7, "checkpoint_every": 0, "max_length": 48, "device": "cpu",
}  # fmt: skip


def _train_args(data: Path, model: Path, output: Path, *extra: str, **overrides) -> list[str]:
    flags = [(f"--{k.replace('_', '-')}", str(v)) for k, v in {**PROMPT, **TRAIN, **overrides}.items()]
    args = ["train", "--task", "translation", "--data", str(data), "--model", str(model), "--output", str(output)]
    return args + [x for flag in flags for x in flag] + ["--quiet", *extra]


def _train_here(data: Path, model: Path, output: Path, resume: bool = False, dist_options=None, **overrides):
    from softtool.prompts.encoder import PromptConfig
    from softtool.training import DataOptions, TrainOptions, train_prompt

    return train_prompt(
        DataOptions(task="translation", data=str(data), task_options={"src": "en", "tgt": "de"}),
        PromptConfig(**PROMPT),
        TrainOptions(**{**TRAIN, **overrides}),
        output,
        model_name=str(model),
        resume=resume,
        progress=False,
        dist_options=dist_options,
    )


def _curve(run: Path) -> list[tuple]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    keys = ("kind", "step", "loss", "dev_loss", "lr", "grad_norm", "tokens")
    return [tuple(row.get(k) for k in keys) for row in rows]


def _assert_same_run(run: Path, reference: Path) -> None:
    ours, ref = _curve(run), _curve(reference)
    assert [r[:2] for r in ours] == [r[:2] for r in ref]
    for a, b in zip(ours, ref, strict=True):
        for x, y in zip(a[2:], b[2:], strict=True):
            assert (x is None) == (y is None)
            if x is not None:
                assert x == pytest.approx(y, rel=RTOL), (a, b)
    table = load_file(run / "adapter_model.safetensors")["prompt_embeddings"]
    ref_table = load_file(reference / "adapter_model.safetensors")["prompt_embeddings"]
    torch.testing.assert_close(table, ref_table, rtol=RTOL, atol=RTOL * float(ref_table.abs().max()))
    # The prompt moved: equal tables are not just two untrained initialisations.
    losses = [row[2] for row in ours if row[0] == "train"]
    assert len(losses) == TRAIN["max_steps"] and losses[-1] != losses[0]


@pytest.fixture(scope="module")
def reference_run(parallel_data, tiny_model_dir, tmp_path_factory) -> Path:
    output = tmp_path_factory.mktemp("runs") / "one-process"
    _train_here(parallel_data, tiny_model_dir, output)
    return output


@pytest.mark.distributed
@pytest.mark.slow
@needs_two_cores
def test_two_ranks_train_the_same_loss_curve_and_prompt_as_one_process(
    reference_run, parallel_data, tiny_model_dir, tmp_path
):
    output = tmp_path / "two-ranks"
    _softtool(_train_args(parallel_data, tiny_model_dir, output), nproc=2)
    _assert_same_run(output, reference_run)
    # Only rank 0 wrote: one metrics file, one plot, one adapter, no stray temporary files.
    assert sorted(p.name for p in output.iterdir() if p.name.startswith(".")) == []


@pytest.mark.distributed
@pytest.mark.slow
@needs_two_cores
def test_two_ranks_with_the_base_sharded_by_fsdp_train_the_same_prompt(
    reference_run, parallel_data, tiny_model_dir, tmp_path
):
    output = tmp_path / "fsdp"
    _softtool(_train_args(parallel_data, tiny_model_dir, output, "--fsdp"), nproc=2)
    _assert_same_run(output, reference_run)


@pytest.mark.slow
def test_device_map_loads_the_base_through_accelerate_and_trains_the_same_prompt(
    reference_run, parallel_data, tiny_model_dir, tmp_path
):
    from softtool.distributed import DistributedOptions

    # No GPU here: accelerate's "auto" map puts every layer on the CPU, which checks the option's plumbing.
    output = tmp_path / "device-map"
    _train_here(parallel_data, tiny_model_dir, output, dist_options=DistributedOptions(device_map="auto"))
    _assert_same_run(output, reference_run)


def test_fsdp_with_generation_during_training_is_refused(parallel_data, tiny_model_dir, tmp_path):
    from softtool.distributed import DistributedOptions

    with pytest.raises(SofttoolError, match="--fsdp cannot be combined with --eval-generate"):
        _train_here(
            parallel_data,
            tiny_model_dir,
            tmp_path / "x",
            eval_generate=True,
            dist_options=DistributedOptions(fsdp=True),
        )


@pytest.mark.distributed
@pytest.mark.slow
@needs_two_cores
def test_distributed_eval_gives_the_single_process_predictions_and_metrics(
    reference_run, parallel_data, tiny_model_dir, tmp_path
):
    from softtool.evaluate import EvalOptions, run_eval

    run_eval(
        reference_run, parallel_data, tmp_path / "one", EvalOptions(batch_size=2, max_new_tokens=6),
        model_name=str(tiny_model_dir), progress=False,
    )  # fmt: skip
    args = ["eval", str(reference_run), "--data", str(parallel_data), "--model", str(tiny_model_dir)]
    _softtool([*args, "--batch-size", "2", "--max-new-tokens", "6", "--quiet", "--output", str(tmp_path / "two")], 2)
    one = (tmp_path / "one" / "predictions.jsonl").read_text()
    assert (tmp_path / "two" / "predictions.jsonl").read_text() == one
    assert len(one.splitlines()) == 7
    m1 = json.loads((tmp_path / "one" / "metrics.json").read_text())
    m2 = json.loads((tmp_path / "two" / "metrics.json").read_text())
    assert m2["metrics"] == m1["metrics"] and m2["n"] == m1["n"] == 7
    assert m2["generated_tokens"] == m1["generated_tokens"]


@pytest.mark.distributed
@pytest.mark.slow
@needs_two_cores
def test_interrupting_one_rank_stops_all_ranks_with_a_resumable_checkpoint(parallel_data, tiny_model_dir, tmp_path):
    import psutil

    output = tmp_path / "interrupted"
    args = _train_args(parallel_data, tiny_model_dir, output, max_steps=100000, checkpoint_every=3)
    launcher = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
        f"--master_port={free_port()}", "-m", "softtool",
    ]  # fmt: skip
    proc = subprocess.Popen(launcher + args, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 90
        while not (output / "checkpoints" / "last.safetensors").exists():
            assert proc.poll() is None, proc.communicate()[1][-3000:]
            assert time.monotonic() < deadline, "no checkpoint within 90 s"
            time.sleep(0.2)
        workers = psutil.Process(proc.pid).children(recursive=True)
        rank1 = [w for w in workers if w.environ().get("RANK") == "1"]
        assert len(rank1) == 1
        rank1[0].send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=60)
    finally:
        _kill_tree(proc)
    assert "interrupted: checkpoint saved" in stderr
    saved = load_checkpoint(output)
    step = saved["state"]["step"]
    assert 3 <= step < 100000
    # Both ranks stopped after the same step and rank 0 saved it: one process continues from there.
    resumed = _train_here(parallel_data, tiny_model_dir, output, resume=True, max_steps=step + 2, checkpoint_every=3)
    assert resumed.result.state.step == step + 2
    assert [row["step"] for row in resumed.result.state.history if row["kind"] == "train"] == list(range(1, step + 3))
