"""Checks of sit_workbench.config: the lmms-engine SiT recipe read as written, the shipped configs, error messages
(unknown keys, types, choices, consistency), exact YAML round trips and dotted overrides."""
import copy
from dataclasses import fields
from pathlib import Path

import pytest
import yaml

import sit_workbench.config as C
from sit_workbench.config import (TrainConfig, ModelConfig, DatasetConfig, load_config, save_config, validate,
                                  config_to_dict, config_from_dict, apply_overrides, digits_config)

CONFIGS = Path(__file__).parents[1] / "configs"

# The structure of lmms-engine's examples/scalable_interpolant_transformer/sit_xl_2.yaml, key for key.
RECIPE = """\
# SiT-XL/2 Training Configuration
- type: trainer
  config:
    trainer_type: sit_trainer
    dataset_config:
      dataset_type: "vision"
      dataset_format: "yaml"
      processor_config:
        processor_type: "sit"
        extra_kwargs:
          image_size: 256
      datasets:
        - path: "path/to/your/imagenet/dataset"
          data_type: "arrow"
    model_config:
      load_from_config:
        model_type: "sit"
        input_size: 32
        patch_size: 2
        in_channels: 4
        hidden_size: 1152
        depth: 28
        num_heads: 16
        mlp_ratio: 4.0
        class_dropout_prob: 0.1
        num_classes: 1000
        learn_sigma: true
        vae_path: "stabilityai/sd-vae-ft-ema"
        path_type: "Linear"
        prediction: "velocity"
        loss_weight: null
        train_eps: null
        sample_eps: null
        cfg_scale: 1.0
    output_dir: "./output/sit_xl_2_training"
    per_device_train_batch_size: 8
    gradient_accumulation_steps: 1
    learning_rate: 1.0e-4
    weight_decay: 0.0
    num_train_epochs: 100
    max_steps: -1
    optim: "adamw_torch"
    adam_beta1: 0.9
    adam_beta2: 0.999
    adam_epsilon: 1.0e-8
    lr_scheduler_type: "cosine"
    warmup_steps: 1000
    save_steps: 1000
    save_total_limit: 5
    logging_steps: 100
    logging_first_step: true
    bf16: true
    tf32: true
    dataloader_num_workers: 4
    dataloader_pin_memory: true
    max_grad_norm: 1.0
    seed: 42
    fsdp2: true
    fsdp_config:
      transformer_layer_cls_to_wrap: ["SiTBlock"]
    remove_unused_columns: false
    report_to: ["tensorboard"]
"""


@pytest.fixture
def recipe_path(tmp_path):
    path = tmp_path / "sit_xl_2.yaml"
    path.write_text(RECIPE)
    return path


def recipe():
    return yaml.safe_load(RECIPE)


def flat(**train):
    "A minimal valid flat-form dict (ImageNet-like), with top-level overrides."
    return {"dataset_config": {"dataset_path": "/data/imagenet/train"}, **train}


# ---------------------------------------------------------------- the recipe form

def test_recipe_loads_and_maps(recipe_path):
    cfg = load_config(recipe_path)
    m, d = cfg.model_config, cfg.dataset_config
    assert m == ModelConfig()  # the recipe's model is SiT-XL/2 with every default
    assert (d.dataset_type, d.dataset_format, d.dataset_path, d.image_size) == \
        ("vision", "arrow", "path/to/your/imagenet/dataset", 256)
    assert cfg.fsdp is True and cfg.fsdp_config == {"transformer_layer_cls_to_wrap": ["SiTBlock"]}
    assert (cfg.max_steps, cfg.num_train_epochs) == (-1, 100.0) and isinstance(cfg.num_train_epochs, float)
    assert (cfg.per_device_train_batch_size, cfg.learning_rate, cfg.lr_scheduler_type, cfg.warmup_steps) == \
        (8, 1e-4, "cosine", 1000)
    assert (cfg.save_total_limit, cfg.max_grad_norm, cfg.seed, cfg.bf16, cfg.tf32) == (5, 1.0, 42, True, True)
    assert cfg.report_to == ["tensorboard"] and cfg.output_dir == "./output/sit_xl_2_training"
    assert cfg.ema_decay == TrainConfig().ema_decay == 0.9999  # not in the recipe: the default stays
    # the dict, the unwrapped entry and the bare config mapping all give the same result
    assert load_config(recipe()) == cfg
    assert load_config(recipe()[0]) == cfg
    assert load_config(recipe()[0]["config"]) == cfg


def test_recipe_image_size_comes_from_the_processor():
    r = recipe()
    r[0]["config"]["dataset_config"]["processor_config"]["extra_kwargs"]["image_size"] = 512
    r[0]["config"]["model_config"]["load_from_config"]["input_size"] = 64
    assert load_config(r).dataset_config.image_size == 512
    r[0]["config"]["dataset_config"]["image_size"] = 512
    with pytest.raises(ValueError, match="image_size is given twice"):
        load_config(r)


def test_recipe_saves_to_flat_form_and_back(recipe_path, tmp_path):
    cfg = load_config(recipe_path)
    out = save_config(cfg, tmp_path / "flat.yaml")
    d = yaml.safe_load(out.read_text())
    assert isinstance(d, dict) and "load_from_config" not in d["model_config"] and "fsdp2" not in d
    assert d["dataset_config"]["dataset_path"] == "path/to/your/imagenet/dataset"
    assert load_config(out) == cfg


def test_recipe_rejects_several_datasets():
    r = recipe()
    r[0]["config"]["dataset_config"]["datasets"].append({"path": "other", "data_type": "arrow"})
    with pytest.raises(ValueError, match="only one dataset entry is supported"):
        load_config(r)


@pytest.mark.parametrize("edit, message", [
    (lambda c: c["dataset_config"]["datasets"][0].update(data_type="json"),
     "dataset_config.datasets[0].data_type: 'json' is not supported; choose one of 'imagefolder', 'hf_dataset', "
     "'arrow', 'parquet'"),
    (lambda c: c["dataset_config"]["datasets"][0].update(data_folder="/images"),
     "unknown key 'dataset_config.datasets[0].data_folder'"),
    (lambda c: c["dataset_config"]["processor_config"].update(processor_type="qwen2_vl"),
     "processor_type: 'qwen2_vl' is not supported"),
    (lambda c: c["dataset_config"]["processor_config"]["extra_kwargs"].update(resolution=256),
     "unknown key 'dataset_config.processor_config.extra_kwargs.resolution'"),
    (lambda c: c["dataset_config"]["processor_config"]["extra_kwargs"].update(image_size="256"),
     "extra_kwargs.image_size: expected int"),
    (lambda c: c["dataset_config"].update(dataset_path="/x"), "not both"),
    (lambda c: c["dataset_config"].pop("datasets"), "dataset_format 'yaml' needs a list"),
    (lambda c: c["model_config"]["load_from_config"].update(hidden_sise=1152),
     "unknown key 'model_config.load_from_config.hidden_sise'; did you mean 'hidden_size'?"),
    (lambda c: c["model_config"].update(attn_implementation="sdpa"), "unknown key 'model_config.attn_implementation'"),
    (lambda c: c.update(fsdp=True), "fsdp2 is another name for fsdp"),
    (lambda c: c.update(use_liger_kernel=True), "unknown key 'use_liger_kernel'"),
    (lambda c: c.update(max_steps=1000), "num_train_epochs (100.0) would be ignored"),
])
def test_recipe_errors(edit, message):
    r = recipe()
    edit(r[0]["config"])
    with pytest.raises(ValueError) as e:
        load_config(r)
    assert message in str(e.value)


def test_recipe_list_must_hold_one_trainer():
    with pytest.raises(ValueError, match="exactly one"):
        load_config(recipe() * 2)
    bad = recipe()
    bad[0]["type"] = "evaluator"
    with pytest.raises(ValueError, match="'evaluator' is not supported"):
        load_config(bad)


def test_load_errors_name_the_file(recipe_path):
    recipe_path.write_text(RECIPE.replace("depth: 28", "depth: 28.5"))
    with pytest.raises(ValueError) as e:
        load_config(recipe_path)
    assert str(e.value).startswith(str(recipe_path))
    assert "model_config.load_from_config.depth: expected int, got 28.5 (float)" in str(e.value)


# ---------------------------------------------------------------- the shipped configs

SIZES = {"s": (12, 384, 6), "b": (12, 768, 12), "l": (24, 1024, 16), "xl": (28, 1152, 16)}


def test_every_shipped_config_loads():
    paths = sorted(CONFIGS.glob("*.yaml"))
    assert {p.name for p in paths} >= {"sit_s_2.yaml", "sit_b_2.yaml", "sit_l_2.yaml", "sit_xl_2.yaml", "digits.yaml"}
    for path in paths:
        cfg = load_config(path)
        assert validate(cfg) is cfg
        with open(path) as f:  # every key is spelt out, so the file documents the whole run
            d = yaml.safe_load(f)
        assert set(d) == {f.name for f in fields(TrainConfig)}, path
        assert set(d["model_config"]) == {f.name for f in fields(ModelConfig)}, path
        assert set(d["dataset_config"]) == {f.name for f in fields(DatasetConfig)}, path


@pytest.mark.parametrize("size", list(SIZES))
def test_imagenet_configs_follow_the_official_recipe(size):
    from sit_workbench.model import SIT_SIZES
    cfg = load_config(CONFIGS / f"sit_{size}_2.yaml")
    m, d = cfg.model_config, cfg.dataset_config
    assert (m.depth, m.hidden_size, m.num_heads) == SIZES[size] == SIT_SIZES[size.upper()]
    assert (m.patch_size, m.input_size, m.in_channels, m.num_classes, m.learn_sigma, m.class_dropout_prob) == \
        (2, 32, 4, 1000, True, 0.1)
    assert (m.vae_path, m.path_type, m.prediction, m.loss_weight) == ("stabilityai/sd-vae-ft-ema", "Linear", "velocity", None)
    assert (d.dataset_format, d.image_size, d.random_flip, d.dataset_path) == \
        ("imagefolder", 256, True, "/path/to/imagenet/train")
    assert cfg.per_device_train_batch_size * 8 * cfg.gradient_accumulation_steps == 256
    assert (cfg.learning_rate, cfg.weight_decay, cfg.lr_scheduler_type, cfg.warmup_steps, cfg.max_grad_norm) == \
        (1e-4, 0.0, "constant", 0, None)
    assert (cfg.ema_decay, cfg.max_steps, cfg.num_train_epochs, cfg.bf16, cfg.tf32) == (0.9999, 400_000, None, True, True)
    assert cfg.output_dir == f"runs/sit_{size}_2"


def test_digits_yaml_is_digits_config(tmp_path):
    assert load_config(CONFIGS / "digits.yaml") == digits_config()
    fresh = save_config(digits_config(), tmp_path / "digits.yaml")
    assert (CONFIGS / "digits.yaml").read_text() == fresh.read_text(), (
        "configs/digits.yaml is out of date: run python -c \"from sit_workbench.config import *; "
        "save_config(digits_config(), 'configs/digits.yaml')\"")


def test_digits_config():
    cfg = digits_config()
    m, d = cfg.model_config, cfg.dataset_config
    assert (d.dataset_format, d.dataset_path, d.image_size, d.random_flip) == ("digits", None, 8, False)
    assert (m.vae_path, m.input_size, m.in_channels, m.num_classes, m.learn_sigma) == (None, 8, 1, 10, False)
    assert cfg.dataloader_num_workers == 0
    assert digits_config(hidden_size=64, split="train", seed=3).model_config.hidden_size == 64
    with pytest.raises(ValueError, match="must be null for the digits"):
        digits_config(vae_path="stabilityai/sd-vae-ft-ema", input_size=1, patch_size=1, in_channels=4)
    with pytest.raises(ValueError, match="dataset_path must be null for the built-in digits"):
        digits_config(dataset_path="/data")
    with pytest.raises(ValueError, match="in_channels must be 1 for the built-in 8x8 digits"):
        digits_config(in_channels=3)


def test_field_names_are_unique_across_sections():
    names = [f.name for cls in (TrainConfig, ModelConfig, DatasetConfig) for f in fields(cls)]
    assert len(names) == len(set(names))  # digits_config(**overrides) routes names by section


def test_choices_match_the_rest_of_the_package():
    import sit_workbench.model as M
    import sit_workbench.transport as T
    assert set(C.PATH_TYPES) == set(T.PATH_TYPES)
    assert set(C.PREDICTIONS) == set(T.PREDICTIONS)
    assert set(C.LOSS_WEIGHTS) == set(T.LOSS_WEIGHTS)
    assert all(isinstance(getattr(M, name), type) for name in C.FSDP_WRAP_CLASSES)


# ---------------------------------------------------------------- error messages

def test_unknown_key_names_dotted_path_and_valid_keys():
    with pytest.raises(ValueError) as e:
        load_config(flat(model_config={"hidden_sise": 64}))
    msg = str(e.value)
    assert "unknown key 'model_config.hidden_sise'" in msg and "did you mean 'hidden_size'?" in msg
    for name in (f.name for f in fields(ModelConfig)):
        assert name in msg
    with pytest.raises(ValueError) as e:
        load_config(flat(dataset_config={"dataset_path": "/d", "imagesize": 64}))
    assert "'dataset_config.imagesize'" in str(e.value) and "did you mean 'image_size'" in str(e.value)
    with pytest.raises(ValueError) as e:
        load_config(flat(fsdp_config={"transformer_layer_cls_to_wrap": ["SiTBlock"], "min_num_params": 1000}))
    assert "unknown key 'fsdp_config.min_num_params'" in str(e.value)
    with pytest.raises(ValueError) as e:
        load_config(flat(zzz=1))
    assert "unknown key 'zzz'." in str(e.value) and "Valid keys of the top level: model_config" in str(e.value)


@pytest.mark.parametrize("d, message", [
    (flat(max_steps="400000"), "max_steps: expected int, got '400000' (str)"),
    (flat(max_steps=4e5), "max_steps: expected int, got 400000.0 (float)"),
    (flat(per_device_train_batch_size=True), "per_device_train_batch_size: expected int, got True (bool)"),
    (flat(learning_rate="fast"), "learning_rate: expected float, got 'fast' (str)"),
    (flat(learning_rate=float("nan")), "learning_rate: expected a finite number"),
    (flat(learning_rate=True), "learning_rate: expected float, got True (bool)"),
    (flat(bf16="yes please"), "bf16: expected bool, got 'yes please' (str)"),
    (flat(bf16=1), "bf16: expected bool, got 1 (int)"),
    (flat(report_to={"tensorboard": True}), "report_to: expected list"),
    (flat(max_grad_norm="none"), "max_grad_norm: expected float or null, got 'none' (str)"),
    (flat(model_config={"vae_path": 3}), "model_config.vae_path: expected str or null, got 3 (int)"),
    (flat(model_config=[1, 2]), "model_config: expected a mapping"),
])
def test_wrong_types(d, message):
    with pytest.raises(ValueError) as e:
        load_config(d)
    assert message in str(e.value)


def test_yaml_float_strings_and_ints_become_floats(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("dataset_config: {dataset_path: /d}\nlearning_rate: 3e-4\nadam_epsilon: 1e-8\nnum_train_epochs: 2\n"
                    "max_steps: -1\nweight_decay: 0\n")
    cfg = load_config(path)
    assert yaml.safe_load("x: 3e-4")["x"] == "3e-4"  # the reason for the string conversion
    assert (cfg.learning_rate, cfg.adam_epsilon, cfg.num_train_epochs, cfg.weight_decay) == (3e-4, 1e-8, 2.0, 0.0)
    assert all(type(v) is float for v in (cfg.learning_rate, cfg.num_train_epochs, cfg.weight_decay))


@pytest.mark.parametrize("d, message", [
    (flat(model_config={"path_type": "linear"}), "choose one of 'Linear', 'GVP', 'VP'"),
    (flat(model_config={"prediction": "epsilon"}), "choose one of 'velocity', 'score', 'noise'"),
    (flat(model_config={"loss_weight": "snr"}), "choose one of None, 'velocity', 'likelihood'"),
    (flat(model_config={"model_type": "dit"}), "model_config.model_type: 'dit' is not a valid choice; choose one of 'sit'"),
    (flat(dataset_config={"dataset_path": "/d", "dataset_format": "json"}), "'imagefolder', 'hf_dataset', 'arrow', 'parquet', 'digits'"),
    (flat(dataset_config={"dataset_path": "/d", "dataset_type": "text"}), "choose one of 'vision'"),
    (flat(optim="adamw_8bit"), "choose one of 'adamw_torch', 'adamw_torch_fused'"),
    (flat(lr_scheduler_type="polynomial"), "choose one of 'constant', 'cosine', 'linear'"),
    (flat(report_to=["jsonl", "wandb"]), "report_to[1]: 'wandb' is not a valid choice; choose one of 'jsonl', 'tensorboard', 'none'"),
    (flat(trainer_type="hf_trainer"), "choose one of 'sit_trainer'"),
    (flat(fsdp_config={"transformer_layer_cls_to_wrap": ["DiTBlock"]}), "choose one of 'SiTBlock'"),
])
def test_bad_choices(d, message):
    with pytest.raises(ValueError) as e:
        load_config(d)
    assert message in str(e.value)


@pytest.mark.parametrize("d, message", [
    (flat(model_config={"num_heads": 5}), "hidden_size (1152) must be divisible by model_config.num_heads (5)"),
    (flat(model_config={"patch_size": 3}), "input_size (32) must be divisible by model_config.patch_size (3)"),
    (flat(model_config={"input_size": 64}), "must be dataset_config.image_size // 8 = 32"),
    (flat(model_config={"in_channels": 3}), "in_channels must be 4"),
    (flat(dataset_config={"dataset_path": "/d", "image_size": 260}, model_config={"input_size": 32}), "multiple of 8"),
    (flat(model_config={"vae_path": None}), "must equal dataset_config.image_size (256) in pixel space"),
    (flat(model_config={"vae_path": None, "input_size": 256},
          dataset_config={"dataset_path": "/d", "latent_cache": "/latents"}), "latent_cache needs a VAE"),
    ({"dataset_config": {"dataset_format": "imagefolder"}}, "dataset_path is required"),
    (flat(dataset_config={"dataset_path": "/d", "image_column": "img"}), "image_column is read only for"),
    (flat(max_steps=0), "max_steps must be positive, or -1"),
    (flat(max_steps=-1), "num_train_epochs must be set"),
    (flat(num_train_epochs=10), "would be ignored"),
    (flat(per_device_train_batch_size=0), "per_device_train_batch_size must be positive"),
    (flat(gradient_accumulation_steps=0), "gradient_accumulation_steps must be positive"),
    (flat(save_steps=0), "save_steps must be positive"),
    (flat(logging_steps=-5), "logging_steps must be positive"),
    (flat(learning_rate=0), "learning_rate must be positive"),
    (flat(ema_decay=1), "ema_decay must be in [0, 1)"),
    (flat(ema_decay=-0.1), "ema_decay must be in [0, 1)"),
    (flat(model_config={"class_dropout_prob": 1.0}), "class_dropout_prob must be in [0, 1)"),
    (flat(model_config={"class_dropout_prob": 0.0, "cfg_scale": 1.5}), "null class"),
    (flat(model_config={"cfg_scale": 0.5}), "cfg_scale must be >= 1.0"),
    (flat(model_config={"loss_weight": "velocity"}), "would be ignored: velocity models"),
    (flat(remove_unused_columns=True), "remove_unused_columns must be false"),
    (flat(report_to=["none", "tensorboard"]), "'none' cannot be combined"),
    (flat(save_total_limit=0), "save_total_limit must be null or >= 1"),
    (flat(max_steps=100, warmup_steps=100), "warmup_steps (100) must be below max_steps (100)"),
])
def test_consistency(d, message):
    with pytest.raises(ValueError) as e:
        load_config(d)
    assert message in str(e.value)


def test_the_flat_example_itself_is_valid():
    # the error cases above differ from this valid config only by what they test
    cfg = load_config(flat())
    assert cfg.model_config == ModelConfig() and cfg.dataset_config.dataset_path == "/data/imagenet/train"
    assert load_config(flat(report_to=["jsonl", "tensorboard"])).report_to == ["jsonl", "tensorboard"]
    assert load_config(flat(report_to="tensorboard")).report_to == ["tensorboard"]
    assert load_config(flat(max_steps=-1, num_train_epochs=3)).num_train_epochs == 3.0
    assert load_config(flat(model_config={"class_dropout_prob": 0.0})).model_config.class_dropout_prob == 0.0
    assert load_config(flat(model_config={"loss_weight": "velocity", "prediction": "score"})).model_config.loss_weight == "velocity"
    assert load_config(flat(resume_from_checkpoint="latest")).resume_from_checkpoint == "latest"
    hf = flat(dataset_config={"dataset_path": "imagenet-1k", "dataset_format": "hf_dataset", "image_column": "image",
                              "label_column": "label", "split": "train"})
    assert load_config(hf).dataset_config.image_column == "image"


def test_validate_works_on_dataclasses_built_in_python():
    cfg = TrainConfig(dataset_config=DatasetConfig(dataset_path="/d"))
    assert validate(cfg) is cfg
    with pytest.raises(ValueError, match="dataset_path is required"):
        validate(TrainConfig())
    with pytest.raises(ValueError, match="model_config.depth: expected int, got '28'"):
        validate(TrainConfig(dataset_config=DatasetConfig(dataset_path="/d"), model_config=ModelConfig(depth="28")))
    with pytest.raises(ValueError, match="ema_decay must be in"):
        validate(TrainConfig(dataset_config=DatasetConfig(dataset_path="/d"), ema_decay=1.0))
    with pytest.raises(TypeError):
        validate(config_to_dict(cfg))


# ---------------------------------------------------------------- round trips and overrides

@pytest.mark.parametrize("cfg", [
    digits_config(),
    TrainConfig(dataset_config=DatasetConfig(dataset_path="/d")),
    TrainConfig(dataset_config=DatasetConfig(dataset_path="/d", dataset_format="parquet", image_column="jpg",
                                             latent_cache="/cache", split="validation"),
                model_config=ModelConfig(path_type="VP", prediction="noise", loss_weight="likelihood", train_eps=1e-5,
                                         sample_eps=1e-3, cfg_scale=4.0, learn_sigma=False),
                learning_rate=3.3e-5, adam_epsilon=1e-12, max_grad_norm=0.5, num_train_epochs=1.5, max_steps=-1,
                save_total_limit=None, report_to=["jsonl", "tensorboard"], fsdp=True, resume_from_checkpoint="latest",
                weight_decay=0.03, ema_decay=0.99995, seed=12345),
], ids=["digits", "defaults", "everything-changed"])
def test_round_trip_is_exact(cfg, tmp_path):
    saved = save_config(cfg, tmp_path / "sub" / "c.yaml")
    back = load_config(saved)
    assert back == cfg
    assert config_to_dict(back) == config_to_dict(cfg)
    assert repr(back) == repr(cfg)  # same values and the same types (1e-12 stays a float, not a string)
    assert config_from_dict(config_to_dict(cfg)) == cfg
    assert save_config(back, tmp_path / "again.yaml").read_text() == saved.read_text()


def test_config_to_dict_copies():
    cfg = digits_config()
    d = config_to_dict(cfg)
    d["fsdp_config"]["transformer_layer_cls_to_wrap"].append("X")
    d["report_to"].append("tensorboard")
    assert cfg == digits_config()


def test_config_from_dict_does_not_touch_its_input():
    r = recipe()
    before = copy.deepcopy(r)
    load_config(r)
    assert r == before


def test_overrides():
    base = digits_config()
    cfg = apply_overrides(base, ["model_config.depth=2", "trainer.learning_rate=3e-4", "max_steps=500",
                                 "dataset_config.random_flip=true", "fsdp2=true", "report_to=[jsonl, tensorboard]",
                                 "resume_from_checkpoint=latest", "max_grad_norm=null",
                                 "fsdp_config.transformer_layer_cls_to_wrap=[SiTBlock]"])
    assert cfg.model_config.depth == 2 and cfg.learning_rate == 3e-4 and type(cfg.learning_rate) is float
    assert (cfg.max_steps, cfg.dataset_config.random_flip, cfg.fsdp, cfg.report_to, cfg.resume_from_checkpoint) == \
        (500, True, True, ["jsonl", "tensorboard"], "latest")
    assert base == digits_config()  # the input is not modified
    assert apply_overrides(base, []) == base
    assert apply_overrides(base, "seed=7").seed == 7
    # later overrides win
    assert apply_overrides(base, ["seed=1", "seed=2"]).seed == 2


@pytest.mark.parametrize("items, message", [
    (["model_config.hidden_sise=64"], "unknown key 'model_config.hidden_sise'; did you mean 'hidden_size'?"),
    (["model.depth=2"], "unknown key 'model'; did you mean 'model_config'?"),
    (["model_config.depth=two"], "model_config.depth: expected int, got 'two' (str)"),
    (["model_config.depth=0"], "model_config.depth must be positive"),
    (["model_config.num_heads=5"], "must be divisible by model_config.num_heads (5)"),
    (["ema_decay=1.0"], "ema_decay must be in [0, 1)"),
    (["seed"], "is not of the form KEY=VALUE"),
    (["=3"], "is not of the form KEY=VALUE"),
    (["output_dir=[unclosed"], "not valid YAML"),
    (["seed.x=1"], "seed is not a section"),
])
def test_override_errors(items, message):
    with pytest.raises(ValueError) as e:
        apply_overrides(digits_config(), items)
    assert message in str(e.value)


def test_repa_config_follows_the_published_recipe():
    "configs/sit_xl_2_repa.yaml: SiT-XL/2 with REPA's published settings (github.com/sihyun-yu/REPA train.py)."
    cfg = load_config(CONFIGS / "sit_xl_2_repa.yaml")
    m = cfg.model_config
    assert (m.depth, m.hidden_size, m.patch_size, m.input_size, m.path_type, m.prediction) == \
        (28, 1152, 2, 32, "Linear", "velocity")
    assert (cfg.repa_encoder, cfg.repa_encoder_resolution, cfg.repa_block, cfg.repa_lambda, cfg.repa_projector_dim) == \
        ("vit_base_patch14_dinov2", 224, 8, 0.5, 2048)
    assert cfg.per_device_train_batch_size * 8 * cfg.gradient_accumulation_steps == 256
    assert (cfg.learning_rate, cfg.weight_decay, cfg.lr_scheduler_type, cfg.warmup_steps, cfg.max_grad_norm) == \
        (1e-4, 0.0, "constant", 0, 1.0)
    assert (cfg.max_steps, cfg.ema_decay, m.class_dropout_prob) == (400_000, 0.9999, 0.1)
    assert 224 // 14 == m.input_size // m.patch_size   # DINOv2's 16x16 patch grid is the model's token grid


@pytest.mark.parametrize("items, message", [
    (["repa_encoder=digits", "repa_block=5"], "repa_block must be in [1, 4]"),
    (["repa_encoder=digits", "repa_block=2", "repa_lambda=0"], "repa_lambda must be positive"),
    (["repa_feature_cache=feats"], "repa_feature_cache is read only with repa_encoder set"),
    (["repa_encoder=digits", "repa_block=2", "repa_encoder_resolution=224"], "not read by the 'digits' encoder"),
    (["repa_encoder=vit_small_patch14_dinov2", "repa_block=2", "model_config.vae_path=ema", "model_config.in_channels=4",
      "dataset_config.image_size=64", "dataset_config.dataset_format=imagefolder", "dataset_config.dataset_path=x",
      "dataset_config.latent_cache=lat"], "set repa_feature_cache"),
])
def test_repa_config_errors(items, message):
    with pytest.raises(ValueError) as e:
        apply_overrides(digits_config(), items)
    assert message in str(e.value)
    ok = [i for i in items if not i.startswith(("repa_lambda", "repa_encoder_resolution", "dataset_config.latent_cache"))]
    if message != "repa_block must be in [1, 4]" and "feature_cache=" not in items[0]:
        apply_overrides(digits_config(), ok)   # the same config without the faulty key is valid
