"""common/config.py: merging, overrides, strict validation, path resolution, CLI exit status."""

import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from common.config import UserError, load_config, parse_override
from tests.conftest import ROOT


def test_repository_configs_validate():
    thesis = load_config(ROOT / "config.yaml")
    demo = load_config(ROOT / "configs" / "demo.yaml")
    assert thesis["train"]["lr"] == 1e-4 and thesis["train"]["batch_size"] == 64
    assert thesis["train"]["early_stopping_patience"] == 20 and thesis["cluster"]["n_per_source"] == 5000
    # demo overrides its base, keeps the rest, and resolves its paths against configs/
    assert demo["run"]["name"] == "demo" and demo["train"]["lr_patience"] == 5
    assert demo["data"]["pcam_dir"] == str(ROOT / "data" / "demo" / "pcam")
    assert thesis["data"]["pcam_dir"] == str(ROOT / "data" / "pcam")


def test_overrides_are_yaml_typed():
    cfg = load_config(ROOT / "config.yaml", ["train.epochs=3", "train.lr=5e-4", "normalize.methods=[macenko]",
                                             "tile_dlbcl.mpp_override=null", "train.resume=auto",
                                             "train.experiment=v2_{model}-{task}", "evaluate.n_bootstrap=1"])
    assert cfg["train"]["epochs"] == 3 and cfg["train"]["lr"] == 5e-4
    assert cfg["train"]["experiment"] == "v2_{model}-{task}" and cfg["evaluate"]["n_bootstrap"] == 1
    assert cfg["normalize"]["methods"] == ["macenko"] and cfg["tile_dlbcl"]["mpp_override"] is None
    assert cfg["train"]["resume"] == "auto"
    assert parse_override("a.b= 1.5") == ("a.b", 1.5)


@pytest.mark.parametrize("override, message", [
    ("train.no_such_key=1", "unknown config key train.no_such_key"),
    ("train.epoch=3", "did you mean 'train.epochs'"),
    ("train.epochs=abc", "train.epochs = 'abc'"),
    ("train.epochs=0", "train.epochs = 0"),
    ("train.task=mixd", "did you mean 'mixed'"),
    ("run.device=gpu", "auto, cpu, cuda or cuda:N"),
    ("train.bf16=1", "true or false"),
    ("filter_pcam.hue_range=[0.1]", "filter_pcam.hue_range"),
    ("normalize.methods=[macenko, foo]", "normalize.methods[1]"),
    ("trainepochs=3", "dotted"),
    # values that used to pass the schema and crash a later step
    ("evaluate.n_bootstrap=0", "evaluate.n_bootstrap = 0 is invalid: expected an integer in [1, inf]"),
    ("cluster.features=[]", "cluster.features = [] is invalid: expected a non-empty list of one of pixels"),
    ("normalize.methods=[]", "normalize.methods = [] is invalid: expected a non-empty list of one of none"),
    ("train.experiment=x_{foo}", "train.experiment = 'x_{foo}' is invalid: unknown placeholder {foo} "
                                 "(allowed: {task}, {model})"),
    ("train.experiment=x_{0}", "unknown placeholder {0} (allowed: {task}, {model})"),
    ("train.experiment=x_{task", "train.experiment = 'x_{task' is invalid: an unmatched { or } (placeholders "
                                 "allowed: {task}, {model})"),
    ("train.experiment=x_}", "train.experiment = 'x_}' is invalid: an unmatched { or }"),
    # 03 needs all three PCam splits from 01's last run: 01 no longer takes a subset
    ("filter_pcam.splits=[train]", "unknown config key filter_pcam.splits"),
])
def test_bad_values_name_the_key(override, message):
    with pytest.raises(UserError, match=re.escape(message)):
        load_config(ROOT / "config.yaml", [override])


def test_base_file_and_missing_key(tmp_path: Path):
    base = yaml.safe_load((ROOT / "config.yaml").read_text())
    del base["train"]["epochs"]
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(base))
    (tmp_path / "child.yaml").write_text("base: base.yaml\nrun: {name: child}\n")
    with pytest.raises(UserError, match="missing key train.epochs"):
        load_config(tmp_path / "child.yaml")
    (tmp_path / "child.yaml").write_text("base: base.yaml\ntrain: {epochs: 2}\nrun: {output_root: out}\n")
    cfg = load_config(tmp_path / "child.yaml")
    assert cfg["train"]["epochs"] == 2 and cfg["run"]["output_root"] == str(tmp_path / "out")


def test_cli_unknown_key_exits_2_with_one_line():
    proc = subprocess.run([sys.executable, "05_train.py", "--set", "train.no_such_key=1"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "train.no_such_key" in lines[0]
    assert "Traceback" not in proc.stderr


def test_one_brightness_rule_for_both_sources():
    cfg = load_config(ROOT / "config.yaml")
    assert cfg["filter_pcam"]["value_range"] == cfg["tile_dlbcl"]["value_range"] == [0.25, None]
    with pytest.raises(UserError, match=re.escape("filter_pcam.value_range = [0.25, None] and "
                                                  "tile_dlbcl.value_range = [None, 0.8] differ")):
        load_config(ROOT / "config.yaml", ["tile_dlbcl.value_range=[null, 0.8]"])
    both = load_config(ROOT / "config.yaml", ["tile_dlbcl.value_range=[0.2, 0.8]",
                                              "filter_pcam.value_range=[0.2, 0.8]"])
    assert both["tile_dlbcl"]["value_range"] == [0.2, 0.8]
