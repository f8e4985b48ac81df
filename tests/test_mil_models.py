"""The MIL model zoo: every registered model through the same checks, MIL-Lab reference
outputs, weight loading, and IAAM's ordering and attention."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from msamil_core.errors import MsamilError
from msamil_core.mil import (
    ENCODER_DIMS,
    LoadResult,
    MILModel,
    create_model,
    list_models,
    load_pretrained,
    register_model,
)
from msamil_core.mil import _registry
from msamil_core.mil.iaam import instance_order, position_features

REPO = Path(__file__).resolve().parents[1]
MIL_LAB = Path(os.environ.get("MSAMIL_SHARED_DATA", REPO.parent / "shared" / "data")) / "mil-lab"

IN_DIM = 32
NUM_CLASSES = 3
ALL_MODELS = list_models()


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """The bags here are tiny: a second intra-op thread only adds hand-off cost (tens of
    ms per op when the machine is busy), so these tests run on one and restore the setting."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make_bags(lengths: list[int], seed: int = 0, holes: bool = False):
    """Random bags padded to one length: h [B, M, IN_DIM], mask [B, M], coords [B, M, 2]
    (unique level-0 pixels on a 256-px grid), scales [B, M]. With ``holes`` the last bag's
    padding is spread through it instead of sitting at the end."""
    g = torch.Generator().manual_seed(seed)
    B, M = len(lengths), max(lengths)
    h = torch.randn(B, M, IN_DIM, generator=g)
    mask = torch.zeros(B, M, dtype=torch.bool)
    for b, n in enumerate(lengths):
        mask[b, :n] = True
    if holes:
        mask[-1] = mask[-1, torch.randperm(M, generator=g)]
    cells = torch.stack([torch.randperm(400, generator=g)[:M] for _ in range(B)])
    coords = torch.stack([cells % 20, cells // 20], -1) * 256
    scales = torch.randint(0, 3, (B, M), generator=g)
    return h, mask, coords, scales


def build(name: str, num_classes: int = NUM_CLASSES, **kwargs) -> MILModel:
    torch.manual_seed(0)
    return create_model(name, in_dim=IN_DIM, num_classes=num_classes, **kwargs)


# ----------------------------------------------------------------------------- registry-wide


@pytest.mark.parametrize("name", ALL_MODELS)
def test_model_contract(name):
    """Shapes for B = 1, B > 1 and unbatched input; attention and slide features; a bag of
    one instance; no NaN; a padded batch gives each bag's logits alone; invariance to the
    order of instances where the model claims it."""
    model = build(name).eval()
    h, mask, coords, scales = make_bags([9, 14, 3], holes=True)
    with torch.no_grad():
        one, log = model(h[:1, :9], coords=coords[:1, :9], scales=scales[:1, :9], return_attention=True)
        assert one["logits"].shape == (1, NUM_CLASSES) and one["loss"] is None and log["loss"] == -1
        assert one["attention"].shape == (1, 9)
        torch.testing.assert_close(one["attention"].sum(-1), torch.ones(1), atol=1e-5, rtol=0)
        assert (one["attention"] >= 0).all()

        unbatched, _ = model(h[0, :9], coords=coords[0, :9], scales=scales[0, :9])
        torch.testing.assert_close(unbatched["logits"], one["logits"], atol=1e-5, rtol=1e-5)

        single, _ = model(h[:1, :1], coords=coords[:1, :1], scales=scales[:1, :1], return_attention=True)
        assert single["logits"].shape == (1, NUM_CLASSES)
        torch.testing.assert_close(single["attention"], torch.ones(1, 1), atol=1e-6, rtol=0)

        batch, blog = model(
            h, attn_mask=mask, coords=coords, scales=scales, return_attention=True, return_slide_feats=True
        )
        assert batch["logits"].shape == (3, NUM_CLASSES)
        assert batch["attention"].shape == (3, h.shape[1]) and blog["attention"] is batch["attention"]
        assert batch["slide_feats"].shape[0] == 3
        assert (batch["attention"][~mask] == 0).all()
        for out in (one, single, batch):
            assert torch.isfinite(out["logits"]).all()
        for b in range(3):
            m = mask[b]
            alone, _ = model(h[b : b + 1, m], coords=coords[b : b + 1, m], scales=scales[b : b + 1, m], return_attention=True)
            torch.testing.assert_close(batch["logits"][b : b + 1], alone["logits"], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(batch["attention"][b : b + 1, m], alone["attention"], atol=1e-5, rtol=1e-4)

        if model.permutation_invariant:
            perm = torch.randperm(14, generator=torch.Generator().manual_seed(1))
            a, _ = model(h[1:2, :14], coords=coords[1:2, :14], scales=scales[1:2, :14])
            p, _ = model(h[1:2, perm], coords=coords[1:2, perm], scales=scales[1:2, perm])
            torch.testing.assert_close(a["logits"], p["logits"], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ALL_MODELS)
def test_gradients_reach_every_parameter(name):
    """One training step's loss (with the instance losses of CLAM / DTFD: one bag per class,
    so every per-class instance classifier is used) reaches every trainable parameter."""
    model = build(name).train()
    h, mask, coords, scales = make_bags([10, 16, 6], seed=2)
    results, log = model(
        h, loss_fn=F.cross_entropy, label=torch.arange(NUM_CLASSES), attn_mask=mask, coords=coords, scales=scales
    )
    assert results["loss"].ndim == 0 and torch.isfinite(results["loss"]) and log["loss"] == pytest.approx(results["loss"].item())
    results["loss"].backward()
    params = dict(model.named_parameters())
    assert not [n for n, p in params.items() if p.grad is None], "parameters outside the graph"
    # weight matrices must get a non-zero gradient; a bias may get an exact 0 (the last bias
    # of an attention scorer: softmax ignores a shift shared by all instances)
    assert not [n for n, p in params.items() if p.ndim > 1 and not p.grad.abs().sum() > 0], "zero gradients"
    assert all(torch.isfinite(p.grad).all() for p in params.values())


@pytest.mark.parametrize("name", ALL_MODELS)
def test_rebuild_from_model_args_and_reset_classifier(name):
    model = build(name)
    twin = create_model(model.model_name, **model.model_args)
    assert {k: v.shape for k, v in twin.state_dict().items()} == {k: v.shape for k, v in model.state_dict().items()}
    model.reset_classifier(5)
    assert model.num_classes == 5 and model.model_args["num_classes"] == 5
    h, mask, coords, scales = make_bags([5, 8])
    with torch.no_grad():
        assert model.eval()(h, attn_mask=mask, coords=coords, scales=scales)[0]["logits"].shape == (2, 5)


# ----------------------------------------------------------------------------- registry


def test_registry_names_and_errors():
    expected = {
        "msamil.base", "abmil.base", "abmil.plain", "transmil.base", "dsmil.base", "clam_sb.base", "clam_mb.base",
        "transformer.base", "dftd.base", "ilra.base", "rrt.base", "wikg.base", "meanmil.base", "maxmil.base",
        "minet.base",
    }  # fmt: skip
    assert expected <= set(ALL_MODELS)
    assert list_models("clam_sb.*") == sorted(n for n in ALL_MODELS if n.startswith("clam_sb."))
    with pytest.raises(MsamilError, match="did you mean abmil.base"):
        create_model("abmill.base")
    with pytest.raises(MsamilError, match="embed_dm"):
        create_model("abmil.base", embed_dm=3)
    with pytest.raises(MsamilError, match="pretrained"):
        create_model("abmil.base.uni.pc108-24k")
    model = create_model("abmil.base.conch_v15.none")
    assert model.in_dim == ENCODER_DIMS["conch_v15"] == 768 and model.model_name == "abmil.base"
    with pytest.raises(MsamilError, match="in_dim=32"):
        build("abmil.base")(torch.randn(1, 4, 16))


def test_register_model_bare_decorator():
    @register_model
    def tiny_meanmil_for_test(**kwargs):
        return create_model("meanmil.base", **kwargs)

    try:
        assert "tiny_meanmil_for_test" in list_models()
        assert create_model("tiny_meanmil_for_test", in_dim=8).in_dim == 8
    finally:
        _registry._entrypoints.pop("tiny_meanmil_for_test")  # leave the registry as other tests expect it


# ----------------------------------------------------------------------------- MIL-Lab references


@pytest.mark.parametrize("name", ["abmil.base", "transmil.base"])
def test_mil_lab_reference_logits(name):
    """MIL-Lab's own state dicts (keys prefixed ``model.``) load strictly and reproduce its
    eval-mode logits."""
    path = MIL_LAB / f"{name}.pt"
    if not path.exists():
        pytest.fail(f"test data missing: {path} (../shared/data must sit beside the repository)")
    ref = torch.load(path, weights_only=True)
    assert all(k.startswith("model.") for k in ref["state_dict"])
    model = create_model(ref["model_name"], num_classes=ref["num_classes"]).eval()
    assert model.in_dim == ref["in_dim"]
    result = load_pretrained(model, path, strict=True)
    assert result == LoadResult(str(path), [], [], False)
    with torch.no_grad():
        logits = model(ref["input"])[0]["logits"]
    torch.testing.assert_close(logits, ref["logits"], atol=1e-5, rtol=0)


# ----------------------------------------------------------------------------- load_pretrained


def test_load_pretrained_prefixes_and_checkpoint(tmp_path):
    src = build("dsmil.base").eval()
    h = torch.randn(1, 11, IN_DIM)
    expected = src(h)[0]["logits"]
    wrapped = {"state_dict": {f"module.model.{k}": v for k, v in src.state_dict().items()}}
    torch.save(wrapped, tmp_path / "ddp.pth")
    checkpoint = {
        "model_name": src.model_name, "model_args": src.model_args, "state_dict": src.state_dict(),
        "classes": ["a", "b", "c"], "epoch": 3,
    }  # fmt: skip
    torch.save(checkpoint, tmp_path / "checkpoint.pt")
    for file in ("ddp.pth", "checkpoint.pt"):
        model = build("dsmil.base")
        torch.nn.init.zeros_(model.classifier.weight)
        result = load_pretrained(model, tmp_path / file, strict=True)
        assert not result.missing_keys and not result.unexpected_keys and not result.classifier_reset
        torch.testing.assert_close(model.eval()(h)[0]["logits"], expected)
    ckpt = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    rebuilt = create_model(ckpt["model_name"], checkpoint_path=tmp_path / "checkpoint.pt", **ckpt["model_args"])
    torch.testing.assert_close(rebuilt.eval()(h)[0]["logits"], expected)


def test_load_pretrained_reinitialises_classifier_for_other_class_count(tmp_path, caplog):
    src = build("clam_mb.base")
    torch.save({f"model.{k}": v for k, v in src.state_dict().items()}, tmp_path / "three.bin")
    model = build("clam_mb.base", num_classes=5)
    with caplog.at_level(logging.INFO, logger="msamil_core.mil.pretrained"):
        result = load_pretrained(model, tmp_path / "three.bin", strict=True)
    assert result.classifier_reset and not result.missing_keys and not result.unexpected_keys
    assert "re-initialised" in caplog.text
    torch.testing.assert_close(model.patch_embed[0].weight, src.patch_embed[0].weight)
    torch.testing.assert_close(model.global_attn.attention_a[0].weight, src.global_attn.attention_a[0].weight)
    assert model.global_attn.attention_c.out_features == 5 and len(model.instance_classifiers) == 5
    assert model.eval()(torch.randn(2, 6, IN_DIM))[0]["logits"].shape == (2, 5)

    same = build("clam_mb.base")
    assert not load_pretrained(same, tmp_path / "three.bin").classifier_reset
    assert load_pretrained(same, tmp_path / "three.bin", keep_classifier=False).classifier_reset


def test_load_pretrained_reports_missing_and_unexpected(tmp_path):
    sd = build("abmil.base").state_dict()
    sd.pop("global_attn.attention_c.weight")
    sd["extra.weight"] = torch.zeros(2)
    torch.save(sd, tmp_path / "partial.pt")
    model = build("abmil.base")
    result = load_pretrained(model, tmp_path / "partial.pt")
    assert result.missing_keys == ["global_attn.attention_c.weight"] and result.unexpected_keys == ["extra.weight"]
    with pytest.raises(MsamilError, match="partial.pt.*strict=False"):
        load_pretrained(model, tmp_path / "partial.pt", strict=True)


def test_load_pretrained_fails_clearly(tmp_path):
    torch.save(build("abmil.base").state_dict(), tmp_path / "abmil32.pt")
    wider = create_model("abmil.base", in_dim=64, num_classes=NUM_CLASSES)
    with pytest.raises(MsamilError, match=r"abmil32\.pt: weights do not fit abmil\.base: patch_embed\.0\.weight"):
        load_pretrained(wider, tmp_path / "abmil32.pt")
    with pytest.raises(MsamilError, match=r"nothing\.pt: weights file not found"):
        load_pretrained(wider, tmp_path / "nothing.pt")
    torch.save(build("ilra.base").state_dict(), tmp_path / "ilra.pt")  # shares only the classifier
    with pytest.raises(MsamilError, match=r"ilra\.pt: none of its .* belong to abmil\.base"):
        load_pretrained(build("abmil.base"), tmp_path / "ilra.pt")
    torch.save({"optimizer": object.__new__(LoadResult)}, tmp_path / "pickled.pt")  # needs unpickling
    with pytest.raises(MsamilError, match=r"pickled\.pt: cannot be read as model weights"):
        load_pretrained(wider, tmp_path / "pickled.pt")
    (tmp_path / "garbage.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(MsamilError, match="garbage.safetensors: cannot be read"):
        load_pretrained(wider, tmp_path / "garbage.safetensors")
    with pytest.raises(MsamilError) as err:
        load_pretrained(wider, tmp_path / "abmil32.pt")
    assert "\n" not in str(err.value)  # one line for the command line


def test_safetensors_round_trip(tmp_path):
    from safetensors.torch import save_file

    src = build("wikg.base").eval()
    save_file({f"model.{k}": v.contiguous() for k, v in src.state_dict().items()}, str(tmp_path / "model.safetensors"))
    model = build("wikg.base")
    torch.nn.init.zeros_(model.W_head.weight)
    load_pretrained(model, tmp_path, strict=True)  # a snapshot directory holding model.safetensors
    h = torch.randn(1, 9, IN_DIM)
    torch.testing.assert_close(model.eval()(h)[0]["logits"], src(h)[0]["logits"])


# ----------------------------------------------------------------------------- IAAM


def test_iaam_instance_order():
    coords = torch.tensor([[[512, 0], [0, 256], [0, 0], [0, 0], [256, 0]]])
    scales = torch.tensor([[0, 0, 2, 1, 0]])
    mask = torch.tensor([[True, True, True, True, False]])
    # x, then y, then scale; padding last
    assert instance_order(coords, scales, mask).tolist() == [[3, 2, 1, 0, 4]]
    assert instance_order(None, None, mask).tolist() == [[0, 1, 2, 3, 4]]
    assert instance_order(None, None, None) is None
    feats = position_features(coords, scales, mask, torch.zeros(1, 5, 8))
    # the bag spans 512 px in x and 256 in y: both divided by 512, so the aspect ratio holds
    torch.testing.assert_close(feats[0, :4, :2], torch.tensor([[1.0, 0.0], [0.0, 0.5], [0.0, 0.0], [0.0, 0.0]]))
    assert feats[0, :, 2].tolist() == [0, 0, 2, 1, 0] and feats[0, 4, :2].tolist() == [0, 0]


def test_iaam_reads_positions_not_input_order():
    model = build("msamil.base").eval()
    h, _, coords, scales = make_bags([30], seed=3)
    perm = torch.randperm(30, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, _ = model(h, coords=coords, scales=scales, return_attention=True)
        b, _ = model(h[:, perm], coords=coords[:, perm], scales=scales[:, perm], return_attention=True)
        moved, _ = model(h, coords=coords.flip(1), scales=scales)
        no_pos, _ = model(h)
    torch.testing.assert_close(a["logits"], b["logits"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(a["attention"][:, perm], b["attention"], atol=1e-6, rtol=1e-4)  # follows the instances
    assert not torch.allclose(a["logits"], moved["logits"], atol=1e-4)  # positions matter
    assert torch.isfinite(no_pos["logits"]).all()


def test_iaam_accepts_float_coords_and_large_bags():
    model = build("msamil.base").train()
    h = torch.randn(1, 3000, IN_DIM, requires_grad=True)
    coords = torch.rand(1, 3000, 2) * 1e5
    results, _ = model(h, loss_fn=F.cross_entropy, label=torch.tensor([1]), coords=coords, return_attention=True)
    results["loss"].backward()
    assert results["attention"].shape == (1, 3000) and torch.isfinite(h.grad).all()


def test_iaam_ablation_options():
    from msamil_core.mil import create_model

    torch.manual_seed(0)
    h = torch.randn(1, 12, 8)
    scales = torch.randint(0, 3, (1, 12))
    coords_a, coords_b = torch.randint(0, 5000, (1, 12, 2)), torch.randint(0, 5000, (1, 12, 2))

    def logits(model, coords):
        return model.eval()(h, coords=coords, scales=scales)[0]["logits"]

    # without both encodings IAAM is a set function: coordinates change nothing
    blind = create_model("msamil.base", in_dim=8, embed_dim=16, num_heads=2, rank=4,
                         position_encoding=False, sinusoidal_encoding=False)
    assert blind.pos_fc is None
    assert torch.allclose(logits(blind, coords_a), logits(blind, coords_b), atol=1e-5)
    full = create_model("msamil.base", in_dim=8, embed_dim=16, num_heads=2, rank=4)
    assert not torch.allclose(logits(full, coords_a), logits(full, coords_b), atol=1e-5)
    for args in ({"depth": 0}, {"num_queries": 1}, {"gate": "sigmoid"}, {"rank": 16}):
        model = create_model("msamil.base", in_dim=8, embed_dim=16, num_heads=2, **{"rank": 4, **args})
        assert logits(model, coords_a).shape == (1, 2)
    assert len(create_model("msamil.base", in_dim=8, embed_dim=16, num_heads=2, rank=4, depth=0).blocks) == 0


# ----------------------------------------------------------------------------- mi-Net


def test_minet_obeys_the_standard_mil_assumption():
    """Class 0's logit is fixed at 0 and a positive class's logit is the max of its instances',
    so an extra instance never lowers it; attention peaks at the instance that sets it."""
    model = build("minet.base").eval()
    h, mask, _, _ = make_bags([7, 12], seed=4)
    with torch.no_grad():
        out, log = model(h, attn_mask=mask, return_attention=True)
        extra = torch.cat([h, torch.randn(2, 1, IN_DIM)], 1), torch.cat([mask, torch.ones(2, 1, dtype=torch.bool)], 1)
        grown, _ = model(extra[0], attn_mask=extra[1])
        instance = model.instance_logits(h)
    assert (out["logits"][:, 0] == 0).all() and (grown["logits"][:, 1:] >= out["logits"][:, 1:]).all()
    for b in range(2):
        top = instance[b, mask[b]].max(0)
        torch.testing.assert_close(out["logits"][b, 1:], top.values)
        pred = out["logits"][b, 1:].argmax() + 1
        assert int(out["attention"][b].argmax()) == int(top.indices[pred - 1])
    assert log["class_attention"].shape == (2, NUM_CLASSES, h.shape[1])

    every_class = build("minet.base", negative_class=False)
    assert every_class.classifier.out_features == NUM_CLASSES and model.classifier.out_features == NUM_CLASSES - 1
    assert build("minet.base", num_classes=1).eval()(h[:1, :7])[0]["logits"].shape == (1, 1)
