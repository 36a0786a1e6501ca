"""emu3-sim, the scaled-down twin of emu3-gen-a100: the preset differs only in sizes and paths, the offline
assets are in the layouts the real preset reads, and the caption-data evaluation pieces it runs.
No Inception forward here (about 1 s per image on these cores): the e2e test (test_sim_e2e.py) scores."""

import hashlib
import io
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from cca_ray.config import flat_params, load_config

# The only fields emu3-sim may set apart from emu3-gen-a100: sizes (model, images, codebook, batches, steps,
# checkpoint/report intervals), counts (workers, GPUs -> 0 and CPUs, samples, trials, CFG scales, the baseline
# runs each trial-sized budget adds), paths of the local assets, and names.
SIZE_AND_PATH_FIELDS = {
    "preset", "experiment",
    "data.path", "data.image_size", "data.max_images", "data.tokenizer_workers", "data.tokenizer_num_gpus",
    "data.reference_workers", "data.reference_num_gpus", "data.tokenizer_batch_size", "data.reference_batch_size",
    "tokenizer.path", "tokenizer.codebook_size", "model.path", "model.max_prompt_tokens",
    "train.max_steps", "train.micro_batch_size", "train.grad_accum", "train.num_workers", "train.use_gpu",
    "train.cpus_per_worker", "train.checkpoint_every", "train.log_every",
    "sample.batch_size",
    "eval.inception_weights", "eval.num_samples", "eval.proxy_num_samples", "eval.proxy_reference_size",
    "eval.kid_subset_size", "eval.workers", "eval.gpus_per_worker", "eval.cfg_scales",
    "tune.num_trials", "tune.report_every", "tune.baselines",
    "serve.num_gpus", "serve.num_cpus", "serve.max_n", "serve.max_batch_size",
}


def test_emu3_sim_differs_from_emu3_gen_a100_only_in_sizes_and_paths():
    real, sim = flat_params(load_config("emu3-gen-a100")), flat_params(load_config("emu3-sim"))
    assert real.keys() == sim.keys()
    differing = {k for k in real if real[k] != sim[k]}
    assert differing <= SIZE_AND_PATH_FIELDS, sorted(differing - SIZE_AND_PATH_FIELDS)
    # what the twin exists to exercise is the real preset's own setting, not a default both happen to share
    for key, value in {"train.zero_stage": 3, "train.bf16": True, "model.gradient_checkpointing": True,
                       "train.reference": "precomputed", "data.label_column": None, "data.source": "parquet",
                       "eval.extractor": "inception-v3", "model.family": "emu3", "tokenizer.kind": "emu3-vqvae"}.items():
        assert sim[key] == real[key] == value, key


def test_emu3_sim_has_the_a100_tune_space():
    from cca_ray.tune.sweep import load_space

    real, sim = load_space(load_config("emu3-gen-a100")), load_space(load_config("emu3-sim"))
    assert sim["params"] == real["params"] and sim["metric"] == real["metric"] and sim["mode"] == real["mode"]


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    from cca_ray.sim_assets import write_assets

    return write_assets(tmp_path_factory.mktemp("sim_assets"))


def test_sim_inception_is_torch_fidelitys_layout_and_named_by_its_sha256(assets):
    import torch
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    from cca_ray.evaluate.extractors import load_extractor

    path = assets["inception"]
    state = torch.load(path, weights_only=True)
    # the constructor loads it strictly: every tensor of torch-fidelity's network, nothing else
    net = FeatureExtractorInceptionV3("inception-v3-compat", ["2048"], feature_extractor_weights_path=str(path))
    assert state.keys() == net.state_dict().keys() and len(state) > 500
    ext = load_extractor("inception-v3", path.parent / "cache", inception_weights=str(path))
    assert ext.fidelity_name == f"inception-v3-{hashlib.sha256(path.read_bytes()).hexdigest()[:12]}"
    assert ext.num_classes is None  # no classifier head: no condition accuracy


def test_missing_inception_weights_name_the_field(tmp_path):
    from cca_ray.evaluate.extractors import load_extractor

    with pytest.raises(FileNotFoundError, match="eval.inception_weights=.*no such file"):
        load_extractor("inception-v3", tmp_path, inception_weights=str(tmp_path / "absent.pth"))


def test_sim_captions_are_parquet_images_with_captions_and_no_labels(assets):
    from PIL import Image

    from cca_ray.sim_assets import captions

    t = pq.read_table(assets["captions"])
    assert t.column_names == ["image", "caption"] and t.num_rows >= 200
    assert pq.ParquetFile(assets["captions"]).num_row_groups > 1
    assert set(t.column("caption").to_pylist()) == set(captions())
    img = np.asarray(Image.open(io.BytesIO(t.column("image")[0].as_py())))
    assert img.dtype == np.uint8 and img.shape[2] == 3


def test_sim_emu3_is_the_released_layout(assets):
    """What from_pretrained and the emu3-vqvae tokenizer read from Emu3-Gen-hf: config with vq_config and the
    vocabulary map of every visual token; no sidecar of ours."""
    from cca_ray.models import load_model
    from cca_ray.models.emu3.adapter import SIDECAR, visual_token
    from cca_ray.sim_assets import CODEBOOK_SIZE
    from cca_ray.models.emu3.vqvae import Emu3VQVAETokenizer

    d = assets["emu3"]
    cfg = json.loads((d / "config.json").read_text())
    assert cfg["model_type"] == "emu3" and "vq_config" in cfg and not (d / SIDECAR).exists()
    assert all(visual_token(k) in cfg["vocabulary_map"] for k in (0, CODEBOOK_SIZE - 1))
    model = load_model(d, family="emu3")
    assert model.codebook_size == CODEBOOK_SIZE
    tok = Emu3VQVAETokenizer(d, image_size=32, channels=3, codebook_size=CODEBOOK_SIZE, patch_size=8, device="cpu")
    assert tok.grid == (4, 4)


def caption_parquet(path, n, corrupt_rows=()):
    """n tiny PNGs with captions "caption i" (rows in corrupt_rows get bytes that are no image), no labels."""
    from PIL import Image

    images = []
    for i in range(n):
        buf = io.BytesIO()
        Image.fromarray(np.full((8, 8, 3), i, np.uint8)).save(buf, format="PNG")
        images.append(b"not an image" if i in corrupt_rows else buf.getvalue())
    pq.write_table(pa.table({"image": images, "caption": [f"caption {i}" for i in range(n)]}), path, row_group_size=16)
    return path


def test_real_split_decodes_only_its_split_and_stops_at_the_limit(tmp_path):
    """The other split's rows are never decoded (a corrupt image there is not even seen), and a limit stops the
    read: the proxy's train-split reference is the first rows of the train split, not all of it in RAM."""
    from cca_ray.data.sources import split_of
    from cca_ray.evaluate.job import real_split

    f = tmp_path / "c.parquet"
    n = 64
    split = [split_of(f"{f}#{i}", 0, 0.25) for i in range(n)]
    train_rows = [i for i in range(n) if split[i] == "train"]
    caption_parquet(f, n, corrupt_rows=train_rows[3:])
    cfg = load_config("smoke", overrides={"data.source": "parquet", "data.path": str(f), "data.label_column": None,
                                          "data.channels": 3, "data.holdout_fraction": 0.25}, workdir=tmp_path / "w")
    holdout, labels = real_split(cfg, "holdout")
    assert len(holdout) == split.count("holdout") and (labels == -1).all()
    assert [int(x[0, 0, 0]) for x in holdout] == [i for i in range(n) if split[i] == "holdout"]
    first, _ = real_split(cfg, "train", limit=3)  # rows after the third train row are corrupt: never decoded
    assert [int(x[0, 0, 0]) for x in first] == train_rows[:3]


def write_holdout(cfg, labels, prompts):
    """A prepared holdout dataset (shards + manifest) with these labels and prompts, 1x1 code grids."""
    from cca_ray.data.schema import BASE_SCHEMA
    from cca_ray.data.shards import make_manifest, write_manifest, write_table_shards

    d = cfg.data_dir / "holdout"
    n = len(prompts)
    table = pa.table({"codes": [[0]] * n, "grid_h": [1] * n, "grid_w": [1] * n, "label": labels, "prompt": prompts,
                      "source_id": [f"s{i}" for i in range(n)]}, schema=BASE_SCHEMA)
    d.mkdir(parents=True)
    files = write_table_shards(table, d, shard_rows=2)  # two shards: the captions keep their order across them
    write_manifest(d, make_manifest("holdout", {"grid": [1, 1], "codebook_size": 2}, n, files))


def test_caption_holdout_conditions_samples_on_its_captions_in_order_cycled(tmp_path):
    from cca_ray.evaluate.job import EvalSetup, eval_conditions, holdout_conditions

    cfg = load_config("emu3-sim", workdir=tmp_path)
    write_holdout(cfg, [None] * 3, ["a red circle", "a blue square", "a green triangle"])
    by_label, caps = holdout_conditions(cfg)
    assert by_label == {} and caps == ["a red circle", "a blue square", "a green triangle"]
    setup = EvalSetup(cfg, None, None, by_label, cfg.data_dir / "tokenizer", "prompt", caps)
    conds, labels = eval_conditions(setup, 5)
    assert conds == caps + caps[:2] and labels is None


def test_labelled_holdout_conditions_stay_class_balanced(tmp_path):
    from cca_ray.evaluate.job import EvalSetup, eval_conditions, holdout_conditions

    cfg = load_config("smoke", workdir=tmp_path)
    write_holdout(cfg, [1, 0, 1], ["one", "zero", "one"])
    by_label, caps = holdout_conditions(cfg)
    assert by_label == {0: "zero", 1: "one"} and caps == []
    conds, labels = eval_conditions(EvalSetup(cfg, None, None, by_label, cfg.data_dir, "prompt", caps), 3)
    assert conds == ["zero", "one", "zero"] and labels.tolist() == [0, 1, 0]


def test_a_table_without_accuracy_shows_a_dash():
    from cca_ray.evaluate.report import format_table

    row = format_table([{"method": "cca", "guidance": 0.0, "fid": 1.5, "n": 8}]).splitlines()[-1]
    assert row.split("|")[10].strip() == "-"


def test_bf16_is_kept_where_native_else_fp32_with_its_reason():
    from cca_ray.train.engine import cpu_bf16_flags, effective_bf16

    tc = load_config("emu3-sim").train
    bf16, line = effective_bf16(tc, use_gpu=False)
    assert bf16 == bool(cpu_bf16_flags())
    assert line.startswith("precision: bf16" if bf16 else "precision: fp32 fallback: train.bf16 is true")
    assert effective_bf16(tc.model_copy(update={"bf16": False}), use_gpu=False)[0] is False
