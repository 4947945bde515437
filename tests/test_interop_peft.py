"""softtool adapters as PEFT reads them: the base named by its hub id (or, offline, its local folder),
`peft_version`, files readable by others, AutoPeftModelForCausalLM loading one offline in a fresh process,
and one-line errors for the adapter files PEFT would fail on."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest
import torch

from softtool.adapter import (
    CONFIG_FILE,
    META_FILE,
    WEIGHTS_FILE,
    Adapter,
    AdapterMeta,
    load_adapter,
    save_adapter,
    set_peft_base,
)
from softtool.errors import SofttoolError
from softtool.models import DEFAULT_MODEL, EMBEDDED_MODELS, embedded_model_dir

peft = pytest.importorskip("peft")

TEXTS = ["English: A man rides a bike.\nGerman:", "English: Two dogs play.\nGerman:"]

# What a user runs: only PEFT and transformers, the adapter folder as the one argument, no network.
AUTO_PEFT_SCRIPT = """
import json, sys, time
start = time.perf_counter()
from peft import AutoPeftModelForCausalLM
from transformers import AutoTokenizer
model = AutoPeftModelForCausalLM.from_pretrained(sys.argv[1])
tokenizer = AutoTokenizer.from_pretrained(model.peft_config["default"].base_model_name_or_path)
loaded = time.perf_counter() - start
out = []
for text in json.loads(sys.argv[2]):
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
    # use_cache=False: PEFT's cached prompt-tuning generate goes wrong on transformers 5 (docs/training.md).
    new = model.generate(
        input_ids=ids, max_new_tokens=8, do_sample=False, eos_token_id=2, pad_token_id=2, use_cache=False
    )[0]
    new = new[ids.shape[1]:].tolist()
    out.append(new[: new.index(2)] if 2 in new else new)
print(json.dumps({"tokens": out, "load_seconds": loaded}))
"""


def _meta(base: str, n: int = 4, hidden: int = 32) -> AdapterMeta:
    return AdapterMeta(
        base_model=base, num_virtual_tokens=n, token_dim=hidden, vocab_size=49152, template=f"[P:{n}]{{input}}"
    )


def _softtool_tokens(path, model, tokenizer) -> list[list[int]]:
    from softtool.runtime.torch_backend import TorchGenerator
    from softtool.search import SearchOptions

    generator = TorchGenerator.from_adapter(path, model=model, tokenizer=tokenizer)
    options = SearchOptions(max_new_tokens=8, eos_token_ids=[2], pad_token_id=2)
    return [out[0] for out in generator.generate([generator.encode({"input": t}) for t in TEXTS], None, options)]


def _auto_peft_offline(adapter_dir) -> dict:
    """AutoPeftModelForCausalLM in a fresh process with HF_HUB_OFFLINE=1: what loads and what it generates."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"}
    proc = subprocess.run(
        [sys.executable, "-c", AUTO_PEFT_SCRIPT, str(adapter_dir), json.dumps(TEXTS)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_the_default_base_is_named_by_its_hub_id_and_softtool_json_records_the_local_folder(tmp_path):
    path = save_adapter(tmp_path / "ad", Adapter(torch.zeros(4, 576), _meta(DEFAULT_MODEL, hidden=576)))
    config = json.loads((path / CONFIG_FILE).read_text())
    meta = json.loads((path / META_FILE).read_text())
    hub_id = EMBEDDED_MODELS[DEFAULT_MODEL].hub_id
    assert hub_id == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert config["base_model_name_or_path"] == config["tokenizer_name_or_path"] == hub_id
    assert config["peft_version"] == peft.__version__
    assert meta["base_model"] == DEFAULT_MODEL and meta["base_model_id"] == hub_id
    assert meta["base_model_path"] == str(embedded_model_dir(DEFAULT_MODEL).resolve())
    # The config holds every field PEFT's own PromptTuningConfig writes, and PEFT reads it without warnings.
    mine = peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4, token_dim=576)
    assert set(mine.to_dict()) <= set(config)
    with __import__("warnings").catch_warnings():
        __import__("warnings").simplefilter("error")
        read = peft.PeftConfig.from_pretrained(str(path))
    assert read.base_model_name_or_path == hub_id and read.num_virtual_tokens == 4


def test_peft_base_local_names_the_converted_folder_and_set_peft_base_switches_back(tmp_path):
    folder = str(embedded_model_dir(DEFAULT_MODEL).resolve())
    path = save_adapter(
        tmp_path / "ad", Adapter(torch.zeros(4, 576), _meta(DEFAULT_MODEL, hidden=576)), peft_base="local"
    )
    assert json.loads((path / CONFIG_FILE).read_text())["base_model_name_or_path"] == folder
    assert set_peft_base(path, "hub") == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert (
        json.loads((path / CONFIG_FILE).read_text())["base_model_name_or_path"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    )
    assert set_peft_base(path, "local") == folder
    # The train option of the same name chooses it for a training run.
    meta = _meta(DEFAULT_MODEL, hidden=576)
    meta.train_options = {"peft_base": "local"}
    path = save_adapter(tmp_path / "trained", Adapter(torch.zeros(4, 576), meta))
    assert json.loads((path / CONFIG_FILE).read_text())["base_model_name_or_path"] == folder


def test_a_base_without_hub_id_is_named_by_its_absolute_folder(tmp_path, tiny_model_dir, monkeypatch):
    monkeypatch.chdir(tiny_model_dir.parent)
    path = save_adapter(tmp_path / "ad", Adapter(torch.zeros(4, 32), _meta(tiny_model_dir.name)))
    config = json.loads((path / CONFIG_FILE).read_text())
    assert config["base_model_name_or_path"] == str(tiny_model_dir.resolve())
    assert json.loads((path / META_FILE).read_text())["base_model_id"] is None


def test_adapter_files_are_readable_by_others_under_the_default_umask(tmp_path):
    old = os.umask(0o022)
    try:
        path = save_adapter(tmp_path / "ad", Adapter(torch.zeros(4, 32), _meta("some/model")))
    finally:
        os.umask(old)
    for name in (CONFIG_FILE, WEIGHTS_FILE, META_FILE):
        assert (path / name).stat().st_mode & 0o777 == 0o644, name


@pytest.mark.slow
def test_auto_peft_loads_a_softtool_adapter_offline_from_the_converted_folder_and_generates_the_same_tokens(
    tmp_path, smollm2, smollm2_tokenizer
):
    torch.manual_seed(0)
    table = smollm2.get_input_embeddings().weight[torch.randint(0, 5000, (4,))] * 3
    path = save_adapter(tmp_path / "ad", Adapter(table, _meta(DEFAULT_MODEL, hidden=576)), smollm2.config)
    set_peft_base(path, "local")  # offline, PEFT loads the converted base folder instead of the hub id
    start = time.perf_counter()
    result = _auto_peft_offline(path)
    seconds = time.perf_counter() - start
    assert all(result["tokens"])
    assert result["tokens"] == _softtool_tokens(path, smollm2, smollm2_tokenizer)
    assert result["load_seconds"] < 60, result  # seconds, not a minute of hub retries
    print(f"AutoPeftModelForCausalLM offline: loaded in {result['load_seconds']:.1f} s, process {seconds:.1f} s")


@pytest.mark.slow
def test_auto_peft_loads_an_adapter_of_a_local_base_offline_and_generates_the_same_tokens(
    tmp_path, tiny_model_dir, smollm2_tokenizer
):
    from softtool.models import load_model

    model = load_model(str(tiny_model_dir))
    torch.manual_seed(0)
    table = model.get_input_embeddings().weight[torch.randint(0, 5000, (4,))] * 4
    path = save_adapter(tmp_path / "ad", Adapter(table, _meta(str(tiny_model_dir))), model.config)
    result = _auto_peft_offline(path)
    assert all(result["tokens"])
    assert result["tokens"] == _softtool_tokens(path, model, smollm2_tokenizer)


def test_a_peft_trained_prompt_loads_in_softtool_with_peft_s_base_and_shape(tmp_path, tiny_model_dir):
    from softtool.models import load_model

    config = peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=5)
    peft_model = peft.get_peft_model(load_model(str(tiny_model_dir)), config)
    peft_model.save_pretrained(tmp_path / "peft")
    adapter = load_adapter(tmp_path / "peft")
    assert adapter.prompt_table.shape == (5, 32) and adapter.meta.template == "[P:5]{input}"
    assert adapter.meta.base_model == str(tiny_model_dir)


def _edit_config(path, **changes):
    config = json.loads((path / CONFIG_FILE).read_text())
    config.update(changes)
    (path / CONFIG_FILE).write_text(json.dumps(config))


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"peft_type": "LORA"}, "peft_type is 'LORA'"),
        ({"task_type": "SEQ_2_SEQ_LM"}, "task_type is 'SEQ_2_SEQ_LM'"),
        ({"num_virtual_tokens": 7}, "num_virtual_tokens is 7 but adapter_model.safetensors holds a prompt of 4"),
        ({"num_virtual_tokens": "4"}, "num_virtual_tokens must be an integer"),
        ({"token_dim": 64}, "token_dim is 64 but adapter_model.safetensors holds a prompt of 32"),
        ({"num_transformer_submodules": 2}, "num_transformer_submodules must be 1"),
    ],
)
def test_an_adapter_config_peft_would_fail_on_is_refused_in_one_line_naming_it(tmp_path, changes, message):
    path = save_adapter(tmp_path / "ad", Adapter(torch.zeros(4, 32), _meta("some/model")))
    _edit_config(path, **changes)
    with pytest.raises(SofttoolError) as info:
        load_adapter(path)
    assert message in str(info.value) and str(path / CONFIG_FILE) in str(info.value)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("content", ["[1, 2]", "{not json", ""])
def test_an_adapter_config_that_is_not_a_json_object_is_refused(tmp_path, content):
    path = save_adapter(tmp_path / "ad", Adapter(torch.zeros(4, 32), _meta("some/model")))
    (path / CONFIG_FILE).write_text(content)
    with pytest.raises(SofttoolError, match="adapter_config.json"):
        load_adapter(path)


def test_an_adapter_without_adapter_config_is_refused(tmp_path):
    path = save_adapter(tmp_path / "ad", Adapter(torch.zeros(4, 32), _meta("some/model")))
    (path / CONFIG_FILE).unlink()
    with pytest.raises(SofttoolError, match="adapter_config.json is missing"):
        load_adapter(path)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_a_prompt_table_with_nan_or_inf_is_refused_naming_the_file(tmp_path, bad):
    from safetensors.torch import save_file

    path = save_adapter(tmp_path / "ad", Adapter(torch.zeros(4, 32), _meta("some/model")))
    table = torch.zeros(4, 32)
    table[2, 5] = bad
    save_file({"prompt_embeddings": table}, str(path / WEIGHTS_FILE))
    with pytest.raises(SofttoolError, match=r"adapter_model\.safetensors: the prompt table holds NaN or infinite"):
        load_adapter(path)
    with pytest.raises(SofttoolError, match="NaN or infinite"):
        save_adapter(tmp_path / "again", Adapter(table, _meta("some/model")))


def test_a_softtool_json_this_softtool_cannot_read_is_refused_naming_the_softtool_that_wrote_it(tmp_path):
    from softtool import __version__

    path = save_adapter(tmp_path / "ad", Adapter(torch.zeros(4, 32), _meta("some/model")))
    meta = json.loads((path / META_FILE).read_text())
    assert meta["softtool_version"] == __version__
    del meta["template"]
    (path / META_FILE).write_text(json.dumps({**meta, "softtool_version": "0.0.9"}))
    with pytest.raises(SofttoolError, match=r"softtool\.json lacks \['template'\] \(written by softtool 0\.0\.9\)"):
        load_adapter(path)
