"""Pretrained MIL models only transfer to bags of the encoder they were trained on; one experiment
uses the bags of one encoder. MIL-Lab reference weights from ../shared/data/mil-lab; a FEATHER-style
hub repo (model.safetensors + config.json) from an offline Hugging Face cache."""

from __future__ import annotations

import json
import re
import shutil

import numpy as np
import pytest
import torch

from msamil_core.cli import main
from msamil_core.errors import MsamilError
from msamil_core.features.bags import Bag, save_bag
from msamil_core.mil import create_model, load_pretrained
from msamil_core.mil.transfer import check_transfer, pretrained_encoder

from conftest import SHARED_DATA, write_hub_cache

ABMIL_UNI = SHARED_DATA / "mil-lab" / "abmil.base.pt"  # MIL-Lab abmil.base.uni.none, in_dim 1024


def make_bags(root, encoders: list[str], dim: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    rows = ["slide_id,path,label,patient_id"]
    for i, encoder in enumerate(encoders):
        m = 6
        save_bag(root / "bags" / f"s{i}.pt", Bag(
            features=torch.from_numpy(rng.normal(size=(m, dim)).astype(np.float32)),
            coords=torch.from_numpy(rng.integers(0, 4000, (m, 2))), scales=torch.zeros(m, dtype=torch.long),
            patch_size_level0=torch.full((m,), 256), slide_id=f"s{i}", encoder=encoder))
        rows.append(f"s{i},s{i}.svs,{'tumor' if i % 2 else 'normal'},p{i}")
    (root / "sheet.csv").write_text("\n".join(rows) + "\n")
    return root / "bags", root / "sheet.csv"


def train(tmp_path, bags, sheet, *extra) -> int:
    return main(["train", "--features", str(bags), "--sheet", str(sheet), "--out", str(tmp_path / "o"),
                 "--n-folds", "2", "--fold", "0", "--epochs", "1", "--device", "cpu", *extra])


def test_mil_lab_weights_name_their_encoder():
    assert pretrained_encoder(ABMIL_UNI) == ("uni_v1", 1024)
    check_transfer(ABMIL_UNI, "uni_v1-0123456789", 1024, "the bags")
    with pytest.raises(MsamilError, match=r"abmil.base.pt was trained on uni_v1 features \(1024-d\), but the bags "
                                          r"come from resnet50_trunc \(1024-d\)"):
        check_transfer(ABMIL_UNI, "resnet50_trunc-0123456789", 1024, "the bags")
    with pytest.raises(MsamilError, match="transfer mismatch"):
        check_transfer(ABMIL_UNI, "uni_v2-0123456789", 1536, "the bags")


def test_training_refuses_bags_of_another_encoder_before_training(tmp_path, capsys):
    bags, sheet = make_bags(tmp_path, ["resnet50_trunc-0123456789"] * 8, 1024)
    assert train(tmp_path, bags, sheet, "--model", "abmil.base", "--init-from", str(ABMIL_UNI)) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "transfer mismatch" in err[0] and "uni_v1" in err[0] and "resnet50_trunc" in err[0]
    assert not (tmp_path / "o" / "fold0" / "checkpoint.pt").exists()

    # the encoder it was trained on: trains, and the checkpoint records that encoder
    shutil.rmtree(bags.parent / "bags")
    bags, sheet = make_bags(tmp_path, ["uni_v1-0123456789"] * 8, 1024)
    assert train(tmp_path, bags, sheet, "--model", "abmil.base", "--init-from", str(ABMIL_UNI)) == 0
    ckpt = tmp_path / "o" / "fold0" / "checkpoint.pt"
    assert torch.load(ckpt, weights_only=True)["encoder"] == "uni_v1-0123456789"
    assert pretrained_encoder(ckpt) == ("uni_v1", 1024)  # our checkpoint as init_from names it too


def test_one_experiment_one_encoder(tmp_path, capsys):
    bags, sheet = make_bags(tmp_path, ["uni_v1-0123456789"] * 7 + ["uni_v1-abcdefabcd"], 16)
    assert train(tmp_path, bags, sheet, "--model", "abmil.base") == 1
    err = capsys.readouterr().err
    assert re.search(r"bags of two encoders: \S+/s[0-6]\.pt comes from 'uni_v1-0123456789' but \S+/s7\.pt from "
                     r"'uni_v1-abcdefabcd'", err), err
    assert not (tmp_path / "o" / "fold0" / "checkpoint.pt").exists()


def test_feather_hub_repo_loads_offline_and_guards(hub_cache):
    repo = "MahmoodLab/abmil.base.uni_v2.pc108-24k"
    source = create_model("abmil.base", in_dim=1536, num_classes=108)
    from safetensors.torch import save

    state = {f"model.{k}": v.contiguous() for k, v in source.state_dict().items()}  # MIL-Lab's wrapper prefix
    write_hub_cache(hub_cache, repo, {"model.safetensors": save(state), "config.json": json.dumps({}).encode()})
    ref = f"hf-hub:{repo}"
    assert pretrained_encoder(ref) == ("uni_v2", 1536)
    target = create_model("abmil.base", in_dim=1536, num_classes=3)
    result = load_pretrained(target, ref)
    assert result.classifier_reset and not result.missing_keys
    body = next(k for k in source.state_dict() if k in target.state_dict() and not k.startswith(tuple(target.head_prefixes)))
    assert torch.equal(target.state_dict()[body], source.state_dict()[body])
    with pytest.raises(MsamilError, match="transfer mismatch.*uni_v2.*virchow2"):
        check_transfer(ref, "virchow2-0123456789", 2560, "the bags")
    with pytest.raises(MsamilError, match="msamil fetch-weights"):
        load_pretrained(target, "hf-hub:MahmoodLab/abmil.base.conch_v15.pc108-24k")


def test_evaluation_refuses_bags_of_another_encoder_than_the_model(tmp_path, capsys):
    bags, sheet = make_bags(tmp_path, ["uni_v1-0123456789"] * 8, 16)
    assert train(tmp_path, bags, sheet, "--model", "abmil.base") == 0
    for path in bags.glob("*.pt"):  # the same slides, re-extracted with other weights
        bag = torch.load(path, weights_only=True)
        torch.save({**bag, "encoder": "uni_v1-abcdefabcd"}, path)
    args = ["evaluate", "--features", str(bags), "--sheet", str(sheet), "--models", str(tmp_path / "o"),
            "--n-folds", "2", "--fold", "0", "--device", "cpu"]
    capsys.readouterr()
    assert main(args) == 1
    err = capsys.readouterr().err
    assert "bags of two encoders: the model" in err and "'uni_v1-0123456789'" in err and "'uni_v1-abcdefabcd'" in err
    assert not (tmp_path / "o" / "fold0" / "metrics.json").exists()
