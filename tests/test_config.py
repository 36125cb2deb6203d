"""common/config.py: merging, overrides, strict validation, path resolution, CLI exit status."""

import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from common.config import load_config, parse_override
from common.errors import UserError
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


def test_sections_a_run_does_not_read_are_optional(tmp_path: Path, capsys):
    from common import demo
    from common.cli import run

    thesis = load_config(ROOT / "config.yaml")
    assert "demo" not in thesis and load_config(ROOT / "configs" / "demo.yaml")["demo"]["dlbcl_slides"] == 4
    with pytest.raises(UserError, match=r"has no 'demo:' section"):
        thesis["demo"]
    assert run(demo.main, ["--config", str(ROOT / "config.yaml")]) == 2  # the demo needs demo:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no 'demo:' section" in err[0]
    # a config with only what 06 reads: no filter_pcam, tile_dlbcl, normalize, cluster, gradcam, demo
    full = yaml.safe_load((ROOT / "config.yaml").read_text())
    small = {k: full[k] for k in ("run", "train", "evaluate", "tasks")}
    (tmp_path / "small.yaml").write_text(yaml.safe_dump(small))
    cfg = load_config(tmp_path / "small.yaml", ["tasks.dlbcl.balanced_size=100"])
    assert set(cfg) == {"run", "train", "evaluate", "tasks", "_config_path"}
    assert cfg["tasks"]["dlbcl"]["balanced_size"] == 100 and cfg["tasks"]["mixed"]["balanced_size"] == 20000
    with pytest.raises(UserError, match=r"has no 'normalize:' section"):
        cfg["normalize"]
    del small["tasks"]  # train.task must name a task
    (tmp_path / "small.yaml").write_text(yaml.safe_dump(small))
    with pytest.raises(UserError, match=r"train.task = 'pcam' is invalid: expected one of the tasks \(none defined\)"):
        load_config(tmp_path / "small.yaml")


def test_a_task_defined_in_a_child_config_joins_the_base_tasks(tmp_path: Path):
    child = {"base": str(ROOT / "config.yaml"), "train": {"task": "mine"},
             "tasks": {"mine": {"classes": ["benign", "tumour"], "sets": {"my_set": {"source": "lab", "labels":
                                ["benign", "tumour"]}}, "split": "grouped", "split_fractions": [0.6, 0.2, 0.2],
                                "balanced_size": None}}}
    (tmp_path / "child.yaml").write_text(yaml.safe_dump(child))
    cfg = load_config(tmp_path / "child.yaml")
    assert list(cfg["tasks"]) == ["pcam", "dlbcl", "mixed", "mine"]
    assert cfg["tasks"]["mine"]["sets"]["my_set"] == {"source": "lab", "labels": ["benign", "tumour"]}
    assert "reference" not in cfg["tasks"]["mine"]  # optional
    # the thesis's Tables 1-2, with their citation, live in config.yaml
    ref = cfg["tasks"]["mixed"]["reference"]
    assert ref["table"] == "Table 2 (3-class, mixed)" and "Mantu" in ref["citation"]
    assert ref["models"]["resnet18"] == {"accuracy": 87.4, "per_class": {
        "breast": [96.5, 89.4, 92.8], "lymphoma": [74.1, 97.4, 84.2], "negative": [92.5, 81.4, 86.6]}}
    assert cfg["tasks"]["dlbcl"]["reference"]["models"]["resnet50"]["accuracy"] == 85.8


@pytest.mark.parametrize("override, message", [
    ("tasks.mixed.sets.dlbcl.labels=[negative,lymphom]",
     "tasks.mixed.sets.dlbcl.labels names 'lymphom', which is not in tasks.mixed.classes"),
    ("tasks.mixed.sets.dlbcl.labels=[negative,breast]", "tasks.mixed.classes: no set's labels give class 'lymphoma'"),
    ("tasks.pcam.sets.pcam_valid.split=val", "tasks.pcam.sets.pcam_valid.split = 'val' is invalid"),
    ("tasks.dlbcl.split=official", "tasks.dlbcl.split = official needs tasks.dlbcl.sets.dlbcl.split"),
    ("tasks.dlbcl.split_fractions=[0.9,0.1]", "tasks.dlbcl.split_fractions = [0.9, 0.1] is invalid: expected three"),
    ("tasks.dlbcl.split_fractions=[0.9,0.1,0]", "expected three positive numbers"),
    ("tasks.dlbcl.sets.dlbcl.sourc=x", "unknown config key tasks.dlbcl.sets.dlbcl.sourc (did you mean"),
    ("tasks.pcam.classes=[negative,negative]",
     "tasks.pcam.classes = ['negative', 'negative'] is invalid: names repeat"),
    ("tasks.pcam.reference.models.resnet18.per_class.tumour=[1,2,3]", "per_class must name the classes"),
    ("tasks.dlbcl.balanced_size=0", "tasks.dlbcl.balanced_size = 0 is invalid"),
    ("train.task=dlbc", "train.task = 'dlbc' is invalid: expected one of the tasks (pcam, dlbcl, mixed) "
                        "(did you mean 'dlbcl'?)"),
])
def test_bad_tasks_name_the_key(override, message):
    with pytest.raises(UserError, match=re.escape(message)):
        load_config(ROOT / "config.yaml", [override])


def test_a_task_missing_a_key_names_it(tmp_path: Path):
    (tmp_path / "c.yaml").write_text(f"base: {ROOT / 'config.yaml'}\ntasks: {{x: {{classes: [a, b]}}}}\n")
    with pytest.raises(UserError, match="config is missing key tasks.x.sets"):
        load_config(tmp_path / "c.yaml")


@pytest.mark.parametrize("text, message", [
    ("run:\n  name: x\n seed: 1\n", "line 3, column 2: not valid YAML: expected <block end>, but found "
     "'<block mapping start>' (while parsing a block mapping that starts on line 1); the line reads 'seed: 1'"),
    ("train:\n  split_fractions: [0.8, 0.1\n  lr: 1\n", "line 3, column 5: not valid YAML: expected ',' or ']', "
     "but got ':' (while parsing a flow sequence that starts on line 2); the line reads 'lr: 1'"),
    ("run:\n\tname: x\n", "line 2, column 1: not valid YAML: found character '\\t' that cannot start any token; "
                          "the line reads 'name: x'"),
])
def test_yaml_syntax_error_names_file_and_line(tmp_path: Path, text, message):
    # also in a base file: the message names the file that holds the error, not the one given
    (tmp_path / "base.yaml").write_text(text)
    (tmp_path / "child.yaml").write_text("base: base.yaml\n")
    for path in (tmp_path / "base.yaml", tmp_path / "child.yaml"):
        with pytest.raises(UserError) as error:
            load_config(path)
        assert str(error.value) == f"config file {tmp_path / 'base.yaml'}, {message}"


def test_mixed_negatives_from_pcam_only_is_one_override():
    cfg = load_config(ROOT / "config.yaml", ["tasks.mixed.sets.dlbcl.labels=[null,lymphoma]"])
    assert cfg["tasks"]["mixed"]["sets"]["dlbcl"] == {"source": "dlbcl", "labels": [None, "lymphoma"]}
    assert cfg["tasks"]["mixed"]["sets"]["pcam_train"]["labels"] == ["negative", "breast"]


def test_one_brightness_rule_for_both_sources():
    cfg = load_config(ROOT / "config.yaml")
    assert cfg["filter_pcam"]["value_range"] == cfg["tile_dlbcl"]["value_range"] == [0.25, None]
    with pytest.raises(UserError, match=re.escape("filter_pcam.value_range = [0.25, None] and "
                                                  "tile_dlbcl.value_range = [None, 0.8] differ")):
        load_config(ROOT / "config.yaml", ["tile_dlbcl.value_range=[null, 0.8]"])
    both = load_config(ROOT / "config.yaml", ["tile_dlbcl.value_range=[0.2, 0.8]",
                                              "filter_pcam.value_range=[0.2, 0.8]"])
    assert both["tile_dlbcl"]["value_range"] == [0.2, 0.8]


def test_the_config_offers_exactly_the_stain_methods_there_are():
    # schema.py cannot import common.stain (torch) to validate a config, so it names the methods itself
    from common import schema, stain
    assert schema.METHODS == stain.METHODS
