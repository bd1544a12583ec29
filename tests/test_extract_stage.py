"""The extract stage's stamp (pipelines.stages.extract.extraction_settings): what decides whether
existing shards are resumed or deleted and extracted again."""
from __future__ import annotations

import dataclasses

import pytest
import torch

import extractors.config
from extractors.config import ExtractorConfig
from pipelines.config import compose_params, parse_params
from pipelines.stages.extract import extraction_settings


@pytest.fixture(scope="module")
def params():
    return parse_params(compose_params(["extractor=clip"]))


def with_extractor(params, cfg: ExtractorConfig):
    return dataclasses.replace(params, extractor=cfg)


def test_fields_of_other_backbones_leave_the_stamp_alone(params):
    stamp = extraction_settings(params)
    assert stamp["extractor"]["backbone"] == "clip" and stamp["extractor"]["clip"]["clip_window"] == 16
    assert not {"mode", "snippet_len", "stride", "variant", "token", "window"} & set(stamp["extractor"])

    # Changing another backbone's field: the same stamp.
    others = dataclasses.replace(params.extractor, window=7, token="mean", snippet_len=8, mode="snippets")
    assert extraction_settings(with_extractor(params, others)) == stamp
    # The chosen backbone's field does change it.
    assert extraction_settings(with_extractor(params, dataclasses.replace(params.extractor, clip_window=8))) != stamp


def test_a_field_added_to_another_backbone_leaves_the_stamp_alone(params, monkeypatch):
    @dataclasses.dataclass(frozen=True)
    class Later(ExtractorConfig):  # the config as it would be after vim gained a field
        vim_new_field: int = 3

    monkeypatch.setitem(extractors.config.BACKBONE_FIELDS, "vim",
                        (*extractors.config.BACKBONE_FIELDS["vim"], "vim_new_field"))
    monkeypatch.setitem(extractors.config._ALL_BACKBONE_FIELDS, "vim_new_field", "vim")
    later = Later(**dataclasses.asdict(params.extractor))
    assert "vim_new_field" in later.to_dict()
    assert extraction_settings(with_extractor(params, later)) == extraction_settings(params)


def test_the_stamp_records_the_resolved_precision(params, monkeypatch):
    def stamp(precision: str, device: str = "cpu") -> str:
        cfg = dataclasses.replace(params.extractor, precision=precision, device=device)
        return extraction_settings(with_extractor(params, cfg))["extractor"]["precision"]

    # On the CPU auto is fp32: the same shards as an explicit fp32; fp16 and bf16 are not.
    assert stamp("auto") == stamp("fp32") == "float32"
    assert (stamp("fp16"), stamp("bf16")) == ("float16", "bfloat16")
    # device cuda: the actors' GPU, even where this process has none (the head of a Ray cluster).
    assert stamp("auto", device="cuda") == "float16" and stamp("fp32", device="cuda") == "float32"
    # On a machine with a GPU auto is fp16: a CPU run's shards are not resumed as if they were the same.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert stamp("auto", device="auto") == "float16" != stamp("auto", device="cpu")
