"""Issue 15's pretraining choices (docs/fidelity.md): the separators' position encoding
(none / fixed / learned), the loss split by target kind, and ARM's decoder initialisation."""

from __future__ import annotations

import math

import pytest
import torch

from star.models import create_model, to_arm_state_dict
from star.models.pretrain import (
    IMAGE,
    SEP_VALUES,
    SEPARATOR,
    Decoder,
    PackingConfig,
    SequencePacker,
    StarPretrainConfig,
)
from star.train.tasks import PretrainTask

SMALL = dict(img_size=24, patch_size=4, cluster_size=2, embed_dim=32, depth=2,
             decoder_dim=32, decoder_heads=4)


def mae_sincos(dim: int, row: float, col: float) -> torch.Tensor:
    """MAE's get_2d_sincos_pos_embed for one cell, written out element by element: the first
    half encodes the column, the second the row; each half is sin(pos * w_i) then cos(pos * w_i)
    with w_i = 1 / 10000 ** (i / (dim / 4))."""
    quarter = dim // 4
    values = []
    for pos in (col, row):
        freqs = [1.0 / 10000 ** (i / quarter) for i in range(quarter)]
        values += [math.sin(pos * w) for w in freqs] + [math.cos(pos * w) for w in freqs]
    return torch.tensor(values, dtype=torch.float32)


def packer_for(value: str, position: str, dim: int = 32) -> SequencePacker:
    cfg = PackingConfig(img_size=8, patch_size=4, cluster_size=2, images_per_seq=2,
                        sep_value=value, sep_pos_embed=position)
    return SequencePacker(cfg, dim)


def separator_inputs(packer: SequencePacker, dim: int = 32) -> torch.Tensor:
    """The encoder input at every separator token of one packed sequence (patch tokens random)."""
    tokens = torch.randn(packer.cfg.images_per_seq, packer.cfg.grid ** 2, dim)
    seq = packer(tokens)[0]
    return seq[packer.layout.tokens.kind == SEPARATOR]


def test_default_is_fixed_for_encoder_and_decoder():
    config = create_model("star_tiny_pz8").config
    assert config.packing.sep_pos_embed == "fixed" and config.dec_sep_pos_embed == "fixed"
    with pytest.raises(ValueError, match="sep_pos_embed='trained' is not one of none, fixed, learned"):
        create_model("star_tiny_pz8", sep_pos_embed="trained")
    with pytest.raises(ValueError, match="dec_sep_pos_embed='x'"):
        create_model("star_tiny_pz8", dec_sep_pos_embed="x")


def test_none_zeros_separator_is_exactly_zero_with_no_trainable_parameter():
    packer = packer_for("zeros", "none")
    assert list(packer.parameters()) == []
    sep = separator_inputs(packer)
    assert sep.shape[0] == 2 * 4 and torch.equal(sep, torch.zeros_like(sep))
    assert not any("sep" in key for key in packer.state_dict())


@pytest.mark.parametrize("value", ["zeros", "ones", "identity"])
def test_fixed_separator_is_pattern_plus_sincos_of_cell_minus_one(value):
    packer = packer_for(value, "fixed")
    assert list(packer.parameters()) == [] and packer.state_dict() == {}  # a non-persistent buffer
    expected_pos = mae_sincos(32, -1.0, -1.0)
    sep = separator_inputs(packer)
    slots = packer.layout.tokens
    rows = slots.row[slots.kind == SEPARATOR]
    cols = slots.col[slots.kind == SEPARATOR]
    for token, r, c in zip(sep, rows.tolist(), cols.tolist()):
        pattern = {"zeros": 0.0, "ones": 1.0, "identity": 1.0 if r == c else 0.0}[value]
        torch.testing.assert_close(token, pattern + expected_pos, rtol=0, atol=1e-6)
    # the cell (-1, -1) is no patch's: its encoding differs from every row of the 12 x 12 table
    from star.models.pos_embed import sincos_2d_table
    assert torch.cdist(expected_pos[None], sincos_2d_table(32, 12)).min() > 0.1


@pytest.mark.parametrize("position", ["fixed", "none"])
def test_the_four_separator_values_stay_distinct(position):
    torch.manual_seed(0)
    inputs = {value: separator_inputs(packer_for(value, position)) for value in SEP_VALUES}
    for a in SEP_VALUES:
        for b in SEP_VALUES:
            if a < b:
                assert not torch.allclose(inputs[a], inputs[b]), (a, b)
    # only the learned embedding value trains (Table 2's four values: three fixed, one learned)
    trainable = {value: [n for n, _ in packer_for(value, position).named_parameters()] for value in SEP_VALUES}
    assert trainable == {"zeros": [], "ones": [], "identity": [], "embedding": ["sep_embed.weight"]}


def test_learned_keeps_the_previous_parameters_and_names():
    torch.manual_seed(0)
    model = create_model("star_tiny_pz8", embed_dim=32, depth=2, decoder_dim=32, images_per_seq=2,
                         sep_pos_embed="learned", dec_sep_pos_embed="learned")
    params = dict(model.named_parameters())
    assert params["packer.sep_pos_embed"].shape == (1, 1, 32) and params["decoder.sep_pos_embed"].shape == (1, 1, 32)
    assert {"dec_sep_pos_embed", "packer.sep_pos_embed"} <= set(to_arm_state_dict(model.state_dict()))
    sep = separator_inputs(model.packer)
    expected = model.packer.sep_pattern.repeat(2, 1) + params["packer.sep_pos_embed"][0]  # 2 separators
    torch.testing.assert_close(sep, expected, rtol=0, atol=0)
    # a checkpoint of the learned form does not load silently into the fixed form
    fixed = create_model("star_tiny_pz8", embed_dim=32, depth=2, decoder_dim=32, images_per_seq=2)
    with pytest.raises(RuntimeError, match="sep_pos_embed"):
        fixed.load_state_dict(model.state_dict(), strict=True)
    assert not any("sep_pos_embed" in key for key in fixed.state_dict())


@pytest.mark.parametrize("position", ["none", "fixed", "learned"])
def test_decoder_queries_of_separator_targets(position):
    torch.manual_seed(0)
    model = create_model("star_tiny_pz8", embed_dim=32, depth=2, decoder_dim=32, images_per_seq=2,
                         dec_sep_pos_embed=position)
    layout, g = model.layout, model.packing.grid
    queries = model.decoder.queries(layout.decoder_position(g), batch=1)[0]
    ar = model.decoder.ar_token[0, 0]
    expected_sep = {"none": torch.zeros(32), "fixed": mae_sincos(32, -1.0, -1.0)}.get(position)
    if position == "learned":
        expected_sep = model.decoder.sep_pos_embed[0, 0]
        assert "decoder.sep_pos_embed" in dict(model.named_parameters())
    else:
        assert not any("sep_pos_embed" in n for n, _ in model.decoder.named_parameters())
    targets = layout.targets
    for q in range(layout.num_queries):
        if targets.kind[q] == SEPARATOR:
            want = ar + expected_sep
        else:
            want = ar + mae_sincos(32, float(targets.row[q]), float(targets.col[q]))
        torch.testing.assert_close(queries[q], want, rtol=0, atol=1e-6)


# ----------------------------------------------------------------------------- loss split


@pytest.mark.parametrize("extra", [dict(sep_position="SC"), dict(sep_position="CSC"),
                                   dict(sep_type="token", sep_position="SCS")])
def test_loss_split_against_a_hand_computation(extra):
    torch.manual_seed(0)
    model = create_model("star_base_pz16", **SMALL, images_per_seq=3, **extra)
    out = model(torch.randn(6, 3, 24, 24))
    pred, target, kind = out["pred"].detach(), out["target"], out["target_kind"]
    sums, counts = {IMAGE: 0.0, SEPARATOR: 0.0}, {IMAGE: 0, SEPARATOR: 0}
    for s in range(pred.shape[0]):
        for q in range(pred.shape[1]):
            k = int(kind[q])
            sums[k] += float(((pred[s, q].double() - target[s, q].double()) ** 2).sum())
            counts[k] += pred.shape[2]
    loss_image, loss_sep = sums[IMAGE] / counts[IMAGE], sums[SEPARATOR] / counts[SEPARATOR]
    assert out["loss_image"].item() == pytest.approx(loss_image, rel=1e-5)
    assert out["loss_sep"].item() == pytest.approx(loss_sep, rel=1e-5)
    assert not out["loss_image"].requires_grad and not out["loss_sep"].requires_grad
    # the total optimised is the mean over every predicted value: the count-weighted mean
    total = (counts[IMAGE] * loss_image + counts[SEPARATOR] * loss_sep) / (counts[IMAGE] + counts[SEPARATOR])
    assert out["loss"].item() == pytest.approx(total, rel=1e-5)
    n_img = int((kind == IMAGE).sum())
    n_sep = int((kind == SEPARATOR).sum())
    weighted = (n_img * out["loss_image"] + n_sep * out["loss_sep"]) / (n_img + n_sep)
    torch.testing.assert_close(out["loss"].detach(), weighted, rtol=1e-5, atol=0)


def test_arm_has_no_separator_loss():
    torch.manual_seed(0)
    model = create_model("arm_tiny_pz8", embed_dim=32, depth=2, decoder_dim=32)
    out = model(torch.randn(2, 3, 96, 96))
    assert "loss_sep" not in out
    torch.testing.assert_close(out["loss_image"], out["loss"].detach(), rtol=1e-6, atol=0)


class _Engine:
    """Returns prepared model outputs in order, as DeepSpeed's engine returns the model's."""

    def __init__(self, outputs):
        self.outputs = iter(outputs)

    def __call__(self, images):
        return next(self.outputs)


def test_pretrain_task_reports_the_step_mean_of_the_split():
    outputs = [{"loss": torch.tensor(v), "loss_image": torch.tensor(v + 1), "loss_sep": torch.tensor(v + 2)}
               for v in (1.0, 2.0, 4.0)]
    task = PretrainTask(train_loader=None)
    engine = _Engine(outputs)
    batch = type("Batch", (), {"images": None})()
    assert [task.loss(engine, batch).item() for _ in range(2)] == [1.0, 2.0]
    assert task.last_metrics() == {"loss_image": 2.5, "loss_sep": 3.5}  # mean of the 2 micro-batches
    task.loss(engine, batch)
    assert task.last_metrics() == {"loss_image": 5.0, "loss_sep": 6.0}  # reset at each step
    assert task.last_metrics() == {}


# ----------------------------------------------------------------------------- decoder init


def test_decoder_init_is_xavier_on_the_blocks_and_pytorch_default_elsewhere():
    """ARM's models_pretrain.py: dec_block.apply(atten_init_weights) (xavier-uniform, zero
    bias); enc2dec and ar_pred keep nn.Linear's default (kaiming-uniform with a = sqrt(5):
    uniform in +-1/sqrt(fan_in)) with the bias zeroed by _init_weights."""
    torch.manual_seed(0)
    decoder = Decoder(StarPretrainConfig())  # STAR-B's: 4 x 768 -> 4 x 512, 16 x 16 x 3 targets
    for linear in (decoder.enc2dec, decoder.pred):
        fan_out, fan_in = linear.weight.shape
        bound = 1 / math.sqrt(fan_in)
        assert linear.weight.abs().max() <= bound
        assert linear.weight.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.02)
        assert torch.equal(linear.bias, torch.zeros_like(linear.bias))
    # xavier would be about 1.9 x wider for enc2dec (3072 -> 2048): the two are told apart
    assert math.sqrt(2 / (3072 + 2048)) / (1 / math.sqrt(3072) / math.sqrt(3)) > 1.8
    blocks = [m for m in decoder.blocks.modules() if isinstance(m, torch.nn.Linear)]
    assert len(blocks) == 4 * 5  # q, kv, proj, fc1, fc2 per block
    for linear in blocks:
        fan_out, fan_in = linear.weight.shape
        assert linear.weight.abs().max() <= math.sqrt(6 / (fan_in + fan_out))
        assert linear.weight.std().item() == pytest.approx(math.sqrt(2 / (fan_in + fan_out)), rel=0.03)
        assert torch.equal(linear.bias, torch.zeros_like(linear.bias))
