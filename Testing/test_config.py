"""The configuration layer: one working patch, what resolving derives, stages that cannot work together, devices,
and that it is read without torch."""

from __future__ import annotations

import dataclasses
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from SFRSegmentLib.base import choices
from SFRSegmentLib.base.config import (
    CPU_PATCH,
    CPU_SAM_PATCH,
    PATCH_SIZE,
    SMALL_PATCH,
    RetrainConfig,
    RunConfig,
    SamConfig,
    check_device,
    parse_method,
    preset,
    starting_preset,
)
from SFRSegmentLib.base.config_io import to_dict, with_overrides
from SFRSegmentLib.base.errors import InputError

REPO = Path(__file__).resolve().parents[1]


def test_the_config_layer_and_the_choices_import_without_torch():
    code = ("import sys; import SFRSegmentLib.base.config, SFRSegmentLib.base.config_io, SFRSegmentLib.base.choices; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'numpy', 'monai')))")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_the_default_patch_is_written_once_in_the_engine():
    """The paper's patch as a value (``(112, 112, 80)``, ``112 112 80``) stands only where PATCH_SIZE is defined;
    prose may name it (112×112×80)."""
    pattern = re.compile(r"112[,\s]+112[,\s]+80\b")
    places = [(path.name, line.strip()) for path in sorted((REPO / "SFRSegmentLib").rglob("*.py"))
              for line in path.read_text(encoding="utf-8").splitlines() if pattern.search(line)]
    assert places == [("config.py", "PATCH_SIZE = (112, 112, 80)")]


@pytest.mark.parametrize("name", choices.PRESETS)
def test_one_working_patch_gives_each_stage_its_patch(name):
    config = preset(name).resolved()
    expected = {"paper": (PATCH_SIZE, PATCH_SIZE), "cpu": (CPU_SAM_PATCH, CPU_PATCH),
                "small": (SMALL_PATCH, SMALL_PATCH)}[name]
    assert (config.finetune.patch_size, config.retrain.patch_size) == expected
    assert config.inference.patch_size is None  # prediction slides the V-Net's own training patch
    assert config.resolved() == config  # resolving twice changes nothing
    changed = with_overrides(preset(name), {"patch_size": [96, 96, 64]}).resolved()
    assert changed.retrain.patch_size == (96, 96, 64)
    assert changed.finetune.patch_size == (CPU_SAM_PATCH if name == "cpu" else (96, 96, 64))  # cpu: SAM's own
    own = with_overrides(preset(name), {"patch_size": [96, 96, 64], "finetune": {"patch_size": [32, 32, 8]}})
    assert own.resolved().finetune.patch_size == (32, 32, 8)


def test_the_cpu_preset_resolves_to_its_measured_settings():
    config = preset("cpu").resolved()
    assert config.device == "cpu" and config.retrain.iterations == 1500 and config.retrain.lr_schedule == "poly"
    assert {config.retrain.precision, config.inference.precision} == {"bf16_if_native"}
    assert {config.finetune.precision, config.pseudolabel.precision} == {"fp32"}  # bf16 slowed SAM down (docs/user-guide.md)
    assert {config.finetune.device, config.pseudolabel.device, config.retrain.device, config.inference.device} == \
        {"cpu"}
    assert config.finetune.sam.image_size == 256 and config.retrain.ssl.rampup_epoch_iterations == 12
    # LiteMedSAM on the V-Net's working grid: its 256² input holds the 2×2 slices of a patch without resizing them
    assert (config.finetune.base_checkpoint, config.finetune.sam.arch) == ("litemedsam", "tiny_vit")
    assert config.finetune.spacing == config.retrain.spacing == (1.25, 1.25, 1.25)
    height, width, depth = config.finetune.patch_size
    assert (256 // height) * (256 // width) == depth and config.finetune.sam.input_scaling == "unit_range"
    assert config.pseudolabel.largest_component


def test_a_catalog_model_must_be_fine_tuned_as_its_architecture():
    with pytest.raises(InputError) as error:
        with_overrides(preset("paper"), {"finetune": {"base_checkpoint": "litemedsam"}})
    assert error.value.field.endswith("sam.arch") and "tiny_vit" in error.value.message
    config = with_overrides(preset("paper"), {"finetune": {"base_checkpoint": "litemedsam",
                                                           "sam": {"arch": "tiny_vit"}}}).resolved(1)
    assert config.finetune.sam.token_grid == config.finetune.sam.image_size // 4


def test_resolving_sizes_the_sam_head_and_shows_the_method_recipe():
    config = with_overrides(preset("paper"), {"retrain": {"method": "sfr_acmt"}}).resolved(n_classes=3)
    assert config.finetune.sam.num_classes == 3
    printed = to_dict(config)["retrain"]
    assert (printed["iterations"], printed["lr_schedule"]) == (8000, "poly")
    assert with_overrides(RunConfig(), to_dict(config)) == config  # config.json reads back as what ran


@pytest.mark.parametrize("overrides, fields", [
    ({"patch_size": [50, 48, 16]}, ("patch_size", "retrain.patch_size")),
    ({"patch_size": [300, 300, 16], "retrain": {"patch_size": [32, 32, 16]}},
     ("patch_size", "finetune.sam.image_size")),
    ({"finetune": {"patch_size": [300, 300, 16]}}, ("finetune.patch_size", "finetune.sam.image_size")),
    ({"inference": {"stride_xy": 64}, "patch_size": [48, 48, 16]}, ("inference.stride_xy", "patch_size")),
    ({"inference": {"stride_z": 24}, "retrain": {"patch_size": [32, 32, 16]}},
     ("inference.stride_z", "retrain.patch_size")),
    ({"retrain": {"device": "cuda:1"}}, ("retrain.device", "device")),
])
def test_stages_that_cannot_work_together_are_refused_naming_both_fields(tmp_path, overrides, fields):
    with pytest.raises(InputError) as error:
        with_overrides(preset("small"), overrides, source=tmp_path / "c.json")
    message = str(error.value)
    assert "c.json" in message and error.value.field == fields[0]
    for field in fields:
        assert re.search(rf"(?<![\w.]){re.escape(field)}\b", message), (field, message)


def test_a_field_error_in_a_section_names_its_dotted_path():
    with pytest.raises(InputError) as error:
        with_overrides(preset("paper"), {"retrain": {"lr_schedule": "cosine"}})
    assert error.value.field == "retrain.lr_schedule" and "unknown lr_schedule 'cosine'" in str(error.value)


@pytest.mark.parametrize("overrides, field, words", [
    ({"retrain": {"init_weights_share": 0.5}}, "retrain.init_weights_share", "give init_weights"),
    ({"retrain": {"init_weights_share": 1.0, "init_weights": "v.pt"}}, "retrain.init_weights_share", "[0, 1)"),
    ({"update": {"parent_share": -0.1}}, "update.parent_share", "[0, 1)"),
])
def test_averaging_with_the_start_needs_a_start_and_a_share_below_one(overrides, field, words):
    with pytest.raises(InputError) as error:
        with_overrides(preset("small"), overrides)
    assert error.value.field == field and words in str(error.value)


@pytest.mark.parametrize("name", ["auto", "cpu", "cuda", "cuda:0", "cuda:12"])
def test_device_spellings_accepted_everywhere(name):
    assert check_device(name) == name
    config = with_overrides(preset("paper"), {"device": name}).resolved()
    assert config.inference.device == config.retrain.device == name


@pytest.mark.parametrize("name", ["gpu", "cuda:", "cuda:x", "CPU", "cuda:-1", ""])
def test_other_device_spellings_are_refused(name):
    with pytest.raises(InputError, match="device must be one of auto, cuda, cpu or cuda:N"):
        with_overrides(preset("paper"), {"device": name})


def test_the_preset_a_configuration_file_names_is_the_one_it_starts_from(tmp_path):
    assert starting_preset(None, {}) == "paper"
    assert starting_preset(None, {"preset": "cpu"}) == "cpu"
    assert starting_preset("small", {}) == "small" == starting_preset("small", {"preset": "small"})
    with pytest.raises(InputError, match="preset is 'cpu' here but --preset says 'small'") as error:
        starting_preset("small", {"preset": "cpu"}, tmp_path / "c.json")
    assert error.value.field == "preset" and "c.json" in str(error.value)


def test_method_names_parse_and_every_method_has_a_title():
    assert parse_method("sfr_uamt") == {"ssl_method": "uamt", "pseudo_labels": "sam"}
    assert parse_method("supervised") == {"ssl_method": "supervised", "pseudo_labels": "none"}
    assert set(choices.METHOD_TITLES) == set(choices.METHODS) and choices.METHODS[0] == RunConfig().retrain.method
    assert set(choices.SSL_METHOD_TITLES) == set(choices.SSL_METHODS)
    assert set(choices.PSEUDO_LABEL_SOURCE_TITLES) == set(choices.PSEUDO_LABEL_SOURCES)
    for name in choices.METHODS:  # each name is an alias of its two fields, both ways
        retrain = with_overrides(RetrainConfig(), {"method": name})
        assert retrain.method == name and (retrain.ssl_method, retrain.pseudo_labels) == choices.METHOD_PARTS[name]


def test_the_method_alias_and_the_two_fields_agree_or_are_refused(tmp_path):
    two_fields = with_overrides(RunConfig(), {"retrain": {"ssl_method": "uamt", "pseudo_labels": "none"}})
    assert two_fields.retrain.method == "uamt" and not two_fields.retrain.uses_pseudo_labels
    assert "method" not in to_dict(two_fields)["retrain"]  # written as the two fields
    same = with_overrides(RunConfig(), {"retrain": {"method": "sfr_acmt", "ssl_method": "acmt"}})
    assert (same.retrain.ssl_method, same.retrain.pseudo_labels) == ("acmt", "sam")
    source = tmp_path / "c.json"
    with pytest.raises(InputError, match="retrain.method 'sfr_acmt' means retrain.ssl_method 'acmt'") as error:
        with_overrides(RunConfig(), {"retrain": {"method": "sfr_acmt", "ssl_method": "mt"}}, source)
    assert error.value.field == "retrain.method" and "c.json" in str(error.value)
    with pytest.raises(InputError, match="unknown method 'sfr_magic'") as error:
        with_overrides(RunConfig(), {"retrain": {"method": "sfr_magic"}})
    assert error.value.field == "retrain.method"
    with pytest.raises(InputError, match="unknown pseudo_labels 'vnet'") as error:
        with_overrides(RunConfig(), {"retrain": {"pseudo_labels": "vnet"}})
    assert error.value.field == "retrain.pseudo_labels"
    # SAM's token size was called patch_size: a configuration (or a fine-tuned SAM's description) using it still reads
    assert with_overrides(SamConfig(), {"patch_size": 8}).token_size == 8
    assert set(choices.DEVICE_TITLES) == set(choices.DEVICES) and set(choices.PRECISION_DESCRIPTIONS) == \
        set(choices.PRECISIONS)
    assert set(choices.PRESET_TITLES) == set(choices.PRESET_DESCRIPTIONS) == set(choices.PRESETS)


def test_every_option_has_a_help_text():
    config = RunConfig()
    sections = (config, config.finetune, config.finetune.sam, config.pseudolabel, config.retrain, config.retrain.ssl,
                config.sfrplus, config.inference)
    missing = [f"{type(section).__name__}.{spec.name}" for section in sections
               for spec in dataclasses.fields(section) if not spec.metadata.get("help")]
    assert missing == []


@pytest.mark.skipif(not Path("/proc/cpuinfo").is_file(), reason="reads the CPU's flags from Linux's /proc/cpuinfo")
def test_native_bf16_means_the_cpu_has_bf16_instructions_not_only_avx512() -> None:
    # bf16_if_native turns bf16 on only where the CPU computes it; on AVX-512 without AVX512-BF16 oneDNN emulates it
    # at about a third of float32's speed, though it calls that "supported".
    from SFRSegmentLib.base.device import autocast_context, cpu_has_native_bf16

    flags = set(re.findall(r"^flags\s*:(.*)$", Path("/proc/cpuinfo").read_text(), re.M)[0].split())
    assert cpu_has_native_bf16() == bool(flags & {"avx512_bf16", "amx_bf16"})
    with autocast_context(torch.device("cpu"), "bf16_if_native"):
        assert torch.is_autocast_enabled("cpu") == cpu_has_native_bf16()
