import pytest
import torch

from lightning_distill.data import DistilledDataModule
from lightning_distill.export import ExportError, build_export, load_distilled, save_distilled, set_digest
from lightning_distill.synthetic import PixelSet


def _payload(labels="hard"):
    s = PixelSet(ipc=2, num_classes=3, image_shape=(1, 4, 4), labels=labels)
    with torch.no_grad():
        s.images.normal_()
    info = {"dataset": "toy", "preprocessing": {"mean": [0.5], "std": [0.25], "zca": "none"}}
    return build_export(s.view(), s, info, method="Toy", config={"lr": 0.1, "nested": {"a": [1, 2]}}, seed=7)


@pytest.mark.parametrize("labels", ["hard", "soft", "learned"])
def test_round_trip_weights_only(tmp_path, labels):
    p = save_distilled(_payload(labels), tmp_path / "sub" / "distilled.pt")
    raw = torch.load(p, weights_only=True)
    assert raw["images"].dtype == torch.float32 and raw["images"].shape == (6, 1, 4, 4)
    if labels == "hard":
        assert raw["labels"].dtype == torch.int64 and raw["labels"].shape == (6,)
    else:
        assert raw["labels"].dtype == torch.float32 and raw["labels"].shape == (6, 3)
    assert raw["label_kind"] == labels and raw["seed"] == 7 and raw["version"] == 1
    assert load_distilled(p)["config"]["nested"] == {"a": [1, 2]}
    assert not [f for f in p.parent.iterdir() if f.name.endswith(".tmp")]
    assert "step" not in raw  # not given: not invented


def test_step_is_recorded_when_known(tmp_path):
    s = PixelSet(ipc=1, num_classes=2, image_shape=(1, 4, 4))
    payload = build_export(s.view(), s, {"dataset": "toy"}, method="Toy", config={}, seed=0, step=1234)
    assert load_distilled(save_distilled(payload, tmp_path / "d.pt"))["step"] == 1234


def test_set_digest_follows_the_images_and_labels_only(tmp_path):
    a = _payload()
    same = load_distilled(save_distilled(dict(a, config={"other": 1}), tmp_path / "d.pt"))  # the file round trip
    assert set_digest(same) == set_digest(a) and len(set_digest(a)) == 16
    for key in ("images", "labels"):
        changed = dict(a, **{key: a[key].clone()})
        changed[key].view(-1)[0] += 1
        assert set_digest(changed) != set_digest(a)


def test_atomic_write_keeps_the_old_file_on_failure(tmp_path, monkeypatch):
    p = save_distilled(_payload(), tmp_path / "d.pt")
    before = p.read_bytes()

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", boom)
    with pytest.raises(OSError, match="disk full"):
        save_distilled(_payload(), p)
    assert p.read_bytes() == before
    assert [f.name for f in tmp_path.iterdir()] == ["d.pt"]


def test_corrupt_truncated_and_foreign_files(tmp_path):
    good = save_distilled(_payload(), tmp_path / "good.pt")
    bad = tmp_path / "bad.pt"
    bad.write_bytes(good.read_bytes()[: len(good.read_bytes()) // 2])
    with pytest.raises(ExportError, match="corrupt or truncated"):
        load_distilled(bad)
    junk = tmp_path / "junk.pt"
    junk.write_text("hello")
    with pytest.raises(ExportError, match="export the set again"):
        load_distilled(junk)
    other = tmp_path / "other.pt"
    torch.save({"images": torch.zeros(1)}, other)
    with pytest.raises(ExportError, match="missing labels"):
        load_distilled(other)
    with pytest.raises(FileNotFoundError, match="no distilled set"):
        load_distilled(tmp_path / "nope.pt")
    with pytest.raises(ExportError):
        DistilledDataModule(str(junk))


def test_nan_images_refused(tmp_path):
    p = _payload()
    p["images"][0, 0, 0, 0] = float("nan")
    with pytest.raises(ExportError, match="NaN"):
        save_distilled(p, tmp_path / "x.pt")


def test_distilled_datamodule_from_synthetic_is_a_snapshot():
    s = PixelSet(ipc=2, num_classes=3, image_shape=(1, 4, 4), labels="learned")
    dm = DistilledDataModule.from_synthetic(s, batch_size=4)
    with torch.no_grad():
        s.images.add_(1.0)
    assert dm.images.abs().sum() == 0 and dm.num_classes == 3 and dm.label_kind == "learned"
    batches = list(dm.train_dataloader())
    assert [len(b[0]) for b in batches] == [4, 2]
    assert not dm.images.requires_grad


def test_labels_must_fit_the_classes(tmp_path):
    for change, message in [
        (lambda p: p["labels"].__setitem__(0, -1), r"hard labels must be class ids in \[0, 3\)"),
        (lambda p: p.update(labels=torch.zeros(6, 4)), r"float labels must be \(N, num_classes\) = \(N, 3\)"),
        (lambda p: p.update(num_classes=0), "num_classes must be a positive integer"),
        (lambda p: p.update(datamodule="subprocess.run"), "datamodule must be a mapping"),
    ]:
        p = _payload()
        change(p)
        with pytest.raises(ExportError, match=message):
            save_distilled(p, tmp_path / "x.pt")
        torch.save(p, tmp_path / "raw.pt")  # written around the check: refused when read
        with pytest.raises(ExportError, match=message):
            load_distilled(tmp_path / "raw.pt")
