"""Bad input gets one line that names the file or key and the fix (``mimzoo-<cmd>: error: ...``, exit code 2), never
a traceback, and nothing is lost: corrupt CIFAR pickles, unreadable images in an image folder, a cut-short
``last.ckpt``, checkpoints of the wrong kind for mimzoo-eval/mimzoo-export, noise for mimzoo-import, our own
export re-imported, a batch larger than the data, more CPU processes than cores, checkpoint paths with ``=``,
and the tiny encoder's decoder. The entry points are called in this process (their real ``main``, with
``sys.argv`` set); the table of cases is docs/bad_input.md."""

import json
import logging
import os
import pickle
import shutil
import sys
import warnings
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from PIL import Image

from conftest import TINY, TINY_MAE
from mimzoo import evaluate as ev
from mimzoo import train as tr
from mimzoo.checkpoints import export_main, import_main, load_exported, load_pretrained
from mimzoo.cli import available_cores, check_overrides, quote_path_overrides
from mimzoo.data import MIMDataModule
from mimzoo.data.datasets import CIFAR, ImageFolder
from mimzoo.errors import CheckpointError, ConfigError, DataError, one_line, user_errors

QUICK = ["trainer.max_steps=2", "logger=csv", "probe.knn.enabled=false", "recon.enabled=false"]
EVAL_FAST = [
    "data=cifar10_mini",
    "data.num_workers=0",
    "logger=csv",
    "trainer.accelerator=cpu",
    "trainer.enable_progress_bar=false",
]


def reset_logging():
    """The in-process entry points set up Hydra's job logging (handlers on the root logger, warnings captured by
    logging); undo it so later tests see the usual setup."""
    logging.captureWarnings(False)
    root = logging.getLogger()
    for handler in [h for h in root.handlers if type(h) in (logging.StreamHandler, logging.FileHandler)]:
        root.removeHandler(handler)
        handler.close()


@pytest.fixture(autouse=True)
def _restore_logging():
    yield
    reset_logging()


def run_main(main, prog: str, *args: str) -> int:
    """Call an entry point's ``main`` with ``sys.argv = [prog, *args]``; its exit code (0 when it returns)."""
    old = sys.argv
    sys.argv = [prog, *args]
    try:
        main()
        return 0
    except SystemExit as exit_info:
        return exit_info.code
    finally:
        sys.argv = old


def error_line(capsys, prog: str) -> str:
    """stderr must end in exactly one ``<prog>: error: ...`` line and hold no traceback; returns its message."""
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert lines and lines[-1].startswith(f"{prog}: error: "), err
    assert sum("error:" in line for line in lines) == 1, err
    return lines[-1][len(f"{prog}: error: ") :]


def mimzoo_ckpt(model, path: Path) -> Path:
    """A checkpoint as mimzoo-train / mimzoo-import write it (what load_pretrained reads)."""
    ckpt = {"state_dict": model.state_dict(), "hyper_parameters": dict(model.hparams)}
    model.on_save_checkpoint(ckpt)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(ckpt, path)
    return path


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A real two-step mimzoo-train run (checkpoints/last.ckpt, metrics.csv), through the entry point."""
    run_dir = tmp_path_factory.mktemp("trained")
    assert run_main(tr.main, "mimzoo-train", *TINY, *QUICK, f"hydra.run.dir={run_dir}") == 0
    reset_logging()
    return run_dir


# --- CIFAR pickles ---------------------------------------------------------------------------------------
def cifar_copy(tmp_path, damage: str) -> Path:
    """cifar10-mini under ``tmp_path`` with its training batch truncated, made of random bytes, or emptied."""
    src = Path(os.environ["MIMZOO_DATA"]) / "cifar10-mini" / "cifar-10-batches-py"
    dst = tmp_path / "cifar10-mini" / "cifar-10-batches-py"
    shutil.copytree(src, dst)
    batch = dst / "data_batch_1"
    data = batch.read_bytes()
    batch.write_bytes(
        {
            "truncated": data[: len(data) // 2],
            "garbage": os.urandom(4096),
            "empty": b"",
            "foreign": pickle.dumps({"not": "cifar"}),
        }[damage]
    )
    return batch


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty", "foreign"])
def test_corrupt_cifar_pickle_names_the_file_and_the_fix(tmp_path, damage):
    batch = cifar_copy(tmp_path, damage)
    with pytest.raises(DataError) as info:
        CIFAR(str(tmp_path), "cifar10-mini")
    message = str(info.value)
    assert f"{batch} is not a readable cifar10-mini batch" in message and "truncated or corrupt" in message
    assert f"copy {batch.parent} again" in message and "\n" not in message


def test_corrupt_cifar_pickle_through_mimzoo_train(tmp_path, capsys):
    batch = cifar_copy(tmp_path, "truncated")
    code = run_main(
        tr.main, "mimzoo-train", *TINY, *QUICK, f"data.root={tmp_path}", f"hydra.run.dir={tmp_path / 'run'}"
    )
    assert code == 2 and f"{batch} is not a readable cifar10-mini batch" in error_line(capsys, "mimzoo-train")


def test_cifar10_suggests_a_fresh_download(tmp_path):
    folder = tmp_path / "cifar10" / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        (folder / name).write_bytes(b"\x80\x02garbage")
    with pytest.raises(DataError, match=f"delete {folder} and run again with data.download=true"):
        CIFAR(str(tmp_path), "cifar10")


# --- image folders ---------------------------------------------------------------------------------------
def image_folder(root: Path, bad: bool = True) -> list[Path]:
    """train/ and val/ with two classes of 32px PNGs; the train split also gets a truncated PNG, a file of
    random bytes and an empty JPEG. Returns the bad files."""
    rng = np.random.default_rng(0)
    for split, per_class in (("train", 4), ("val", 2)):
        for cls in ("a", "b"):
            folder = root / split / cls
            folder.mkdir(parents=True)
            for i in range(per_class):
                Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    if not bad:
        return []
    good = (root / "train" / "a" / "0.png").read_bytes()
    bad_files = [
        root / "train" / "a" / "truncated.png",
        root / "train" / "b" / "garbage.png",
        root / "train" / "b" / "empty.jpg",
    ]
    bad_files[0].write_bytes(good[: len(good) // 2])
    bad_files[1].write_bytes(os.urandom(2000))
    bad_files[2].write_bytes(b"")
    return bad_files


def test_unreadable_images_are_skipped_with_a_warning_and_a_count(tmp_path):
    bad = image_folder(tmp_path)
    dataset = ImageFolder(str(tmp_path / "train"))
    assert len(dataset) == 11 and dataset.bad_images == "skip"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        samples = [dataset[i] for i in range(len(dataset))]
    assert all(isinstance(image, Image.Image) and image.size == (32, 32) for image, _ in samples)
    messages = [str(w.message) for w in caught if "skipped unreadable image" in str(w.message)]
    assert len(messages) == 3 and all(any(str(p) in m for m in messages) for p in bad)
    assert sorted(int(m.split("); ")[1].split(" ")[0]) for m in messages) == [1, 2, 3]  # the count so far
    assert dataset.skipped == {str(p) for p in bad}


def test_unreadable_image_can_stop_the_run_naming_it(tmp_path):
    bad = image_folder(tmp_path)
    dataset = ImageFolder(str(tmp_path / "train"), bad_images="error")
    index = next(i for i, (path, _) in enumerate(dataset.samples) if path == str(bad[0]))
    with pytest.raises(DataError, match=f"unreadable image {bad[0]} .*data.bad_images=skip"):
        dataset[index]
    with pytest.raises(ConfigError, match="data.bad_images must be 'skip' or 'error'"):
        ImageFolder(str(tmp_path / "train"), bad_images="ignore")


def test_unreadable_image_in_a_worker_through_mimzoo_train(tmp_path, capsys):
    """The error comes back from a DataLoader worker process, whose traceback is in its message: still one line."""
    bad = image_folder(tmp_path / "images")
    code = run_main(
        tr.main,
        "mimzoo-train",
        *TINY,
        *QUICK,
        "data=imagefolder",
        f"data.root={tmp_path / 'images'}",
        "data.image_size=32",
        "data.patch_size=4",
        "data.batch_size=11",
        "data.num_workers=1",
        "data.bad_images=error",
        f"hydra.run.dir={tmp_path / 'run'}",
    )
    message = error_line(capsys, "mimzoo-train")
    assert code == 2 and message.startswith("unreadable image ") and any(str(p) in message for p in bad)
    assert "DataLoader worker" not in message


@pytest.mark.slow  # trains (in this process)
@pytest.mark.filterwarnings("default::UserWarning")  # pyproject ignores UserWarning; these must show
def test_skipped_images_still_train(tmp_path, capsys):
    image_folder(tmp_path / "images")
    code = run_main(
        tr.main,
        "mimzoo-train",
        *TINY,
        *QUICK,
        "data=imagefolder",
        f"data.root={tmp_path / 'images'}",
        "data.image_size=32",
        "data.patch_size=4",
        "data.batch_size=11",
        "data.num_workers=0",
        f"hydra.run.dir={tmp_path / 'run'}",
    )
    assert code == 0 and (tmp_path / "run" / "checkpoints" / "last.ckpt").is_file()
    assert capsys.readouterr().err.count("skipped unreadable image") == 3


# --- resuming from a cut-short checkpoint ----------------------------------------------------------------
@pytest.mark.slow  # trains (in this process)
@pytest.mark.parametrize("damage", ["empty", "truncated"])
def test_cut_short_last_ckpt_is_named_and_kept(trained, tmp_path, capsys, damage):
    run_dir = tmp_path / "run"
    shutil.copytree(trained, run_dir)
    last = run_dir / "checkpoints" / "last.ckpt"
    good = last.read_bytes()
    other = run_dir / "checkpoints" / "epoch=0-step=2.ckpt"
    other.write_bytes(good)
    last.write_bytes(b"" if damage == "empty" else good[: len(good) // 2])
    before = {p: p.read_bytes() for p in [*(run_dir / "checkpoints").iterdir(), run_dir / "hparams.yaml"]}
    code = run_main(tr.main, "mimzoo-train", *TINY, *QUICK, f"hydra.run.dir={run_dir}", "ckpt_path=last")
    message = error_line(capsys, "mimzoo-train")
    reason = "is empty (0 bytes), a save cut short" if damage == "empty" else "is not a readable torch checkpoint"
    assert code == 2 and f"cannot resume: {last} {reason}" in message
    assert f"it was left as it is; resume from another checkpoint of this run, e.g. ckpt_path={other}" in message
    assert all(p.read_bytes() == data for p, data in before.items())  # nothing lost, nothing written
    assert sorted((run_dir / "checkpoints").iterdir()) == sorted(p for p in before if p.suffix == ".ckpt")


# --- checkpoints of the wrong kind for mimzoo-eval / mimzoo-export ---------------------------------------
@pytest.fixture(scope="module")
def wrong_kinds(tmp_path_factory):
    """A dVAE checkpoint, and the linear-probe and fine-tune checkpoints mimzoo-eval writes (real Lightning
    checkpoints in an eval run dir whose results.json names the pre-training checkpoint)."""
    from mimzoo.eval.finetune import FineTune
    from mimzoo.eval.linear import LinearProbe
    from mimzoo.methods import DVAE, MAE

    root = tmp_path_factory.mktemp("kinds")
    torch.manual_seed(0)
    paths = {
        "dvae": mimzoo_ckpt(
            DVAE(vae=dict(num_tokens=16, downsample=4, hidden_dim=8, code_dim=8, num_resblocks=0)),
            root / "dvae" / "last.ckpt",
        )
    }
    pretrained = MAE(**TINY_MAE)
    for name, module in (
        ("linear", LinearProbe(pretrained, 10)),
        ("finetune", FineTune.from_pretrained(pretrained, 10)),
    ):
        trainer = L.Trainer(
            accelerator="cpu",
            max_steps=1,
            limit_val_batches=0,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
        )
        trainer.fit(module, datamodule=MIMDataModule("fake", batch_size=8, num_workers=0, fake_size=16, num_classes=10))
        paths[name] = root / name / "checkpoints" / "last.ckpt"
        trainer.save_checkpoint(paths[name])
        (root / name / "results.json").write_text(json.dumps({"ckpt": "/runs/pretrain/checkpoints/last.ckpt"}))
    return paths


@pytest.mark.parametrize(
    "kind,expected",
    [
        ("dvae", "is a DVAE checkpoint, a tokenizer stage with no encoder to {purpose}: train BEiT on it"),
        (
            "linear",
            "is a linear-probe checkpoint written by mimzoo-eval (a classifier), not a pre-training checkpoint: "
            "pass ckpt=/runs/pretrain/checkpoints/last.ckpt",
        ),
        ("finetune", "is a fine-tune checkpoint written by mimzoo-eval"),
    ],
)
def test_wrong_kind_of_checkpoint_for_eval_and_export(wrong_kinds, tmp_path, capsys, kind, expected):
    path = wrong_kinds[kind]
    code = run_main(ev.main, "mimzoo-eval", "protocol=knn", f"ckpt={path}", *EVAL_FAST, f"hydra.run.dir={tmp_path}")
    assert code == 2 and f"{path} {expected.format(purpose='evaluate')}" in error_line(capsys, "mimzoo-eval")
    assert not (tmp_path / "results.json").exists()
    with pytest.raises(SystemExit) as exit_info:
        export_main([str(path), str(tmp_path / "vit.pth")])
    assert exit_info.value.code == 2 and expected.format(purpose="export") in error_line(capsys, "mimzoo-export")
    assert not (tmp_path / "vit.pth").exists()


# --- mimzoo-import ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("content", ["noise", "empty", "truncated"])
def test_noise_given_to_mimzoo_import(tmp_path, capsys, content):
    src = tmp_path / "checkpoint.pth"
    if content == "truncated":
        torch.save({"teacher": {"x": torch.zeros(1000)}}, src)
        src.write_bytes(src.read_bytes()[:500])
    else:
        src.write_bytes(os.urandom(5000) if content == "noise" else b"")
    with pytest.raises(SystemExit) as exit_info:
        import_main(["ibot", str(src), str(tmp_path / "out.ckpt")])
    message = error_line(capsys, "mimzoo-import")
    assert exit_info.value.code == 2 and message.startswith(str(src))
    assert ("is empty (0 bytes)" if content == "empty" else "is not a checkpoint torch.load can read safely") in message
    assert not (tmp_path / "out.ckpt").exists()


def test_our_export_reimports_with_its_head_count(tiny_mae, tmp_path, capsys):
    """Width 32 with 2 heads is no standard ViT: the head count comes back from vit.pth.json, not from a guess."""
    ckpt = mimzoo_ckpt(tiny_mae, tmp_path / "mae.ckpt")
    export_main([str(ckpt), str(tmp_path / "vit.pth")])
    assert json.loads((tmp_path / "vit.pth.json").read_text())["num_heads"] == 2
    import_main(["mae", str(tmp_path / "vit.pth"), str(tmp_path / "back.ckpt")])
    back = load_pretrained(tmp_path / "back.ckpt").eval()
    assert back.hparams.encoder["num_heads"] == 2
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(back.encode(x), tiny_mae.encode(x))
        torch.testing.assert_close(load_exported(tmp_path / "vit.pth").eval().forward_features(x), tiny_mae.encode(x))
    # Without the JSON the count is a guess, and the importer says so.
    alone = tmp_path / "alone" / "vit.pth"
    alone.parent.mkdir()
    shutil.copy(tmp_path / "vit.pth", alone)
    with pytest.warns(UserWarning, match="do not tell the head count; 1 assumed for width 32"):
        import_main(["mae", str(alone), str(tmp_path / "guess.ckpt")])
    with pytest.raises(FileNotFoundError, match="vit.pth.json is missing"):
        load_exported(alone)


# --- batch size, devices ---------------------------------------------------------------------------------
def test_batch_larger_than_the_data(tmp_path, capsys):
    code = run_main(tr.main, "mimzoo-train", *TINY, *QUICK, "data.batch_size=1024", f"hydra.run.dir={tmp_path}")
    captured = capsys.readouterr()
    assert code == 2 and "mimzoo: checkpoint" not in captured.out
    assert (
        "mimzoo-train: error: data.batch_size=1024 is larger than the 512 training images of cifar10-mini, so no "
        "full batch is left: set data.batch_size=512 or less"
    ) in captured.err
    assert not (tmp_path / "checkpoints" / "last.ckpt").exists()


def test_summary_names_no_checkpoint_that_does_not_exist(tmp_path, capsys):
    from types import SimpleNamespace

    tr.summarize(tmp_path, SimpleNamespace(loggers=[]), {})
    assert "mimzoo: checkpoint      none written" in capsys.readouterr().out


def test_more_cpu_processes_than_cores(tmp_path, capsys):
    n = available_cores() + 1
    expected = (
        f"trainer.devices={n} starts {n} CPU training processes but this machine gives the run "
        f"{n - 1} core(s): set trainer.devices={n - 1} or less (on CPU each device is a process)"
    )
    code = run_main(
        tr.main,
        "mimzoo-train",
        *TINY,
        *QUICK,
        "trainer.accelerator=cpu",
        f"trainer.devices={n}",
        f"hydra.run.dir={tmp_path / 'train'}",
    )
    assert code == 2 and error_line(capsys, "mimzoo-train") == expected
    code = run_main(
        ev.main, "mimzoo-eval", *EVAL_FAST, f"trainer.devices={n}", "ckpt=x.ckpt", f"hydra.run.dir={tmp_path / 'eval'}"
    )
    assert code == 2 and error_line(capsys, "mimzoo-eval") == expected


# --- paths with '=' --------------------------------------------------------------------------------------
def test_paths_with_equals_are_quoted_for_hydra():
    assert quote_path_overrides(
        [
            "ckpt=runs/a/epoch=3-step=100.ckpt",
            "+ckpt_path=x=y",
            "mask.ratio=0.5",
            "-m",
            "ckpt='already=quoted'",
            "x=range(start=1,stop=3)",
            "--config-dir",
            "a=b=c",
        ]
    ) == [
        "ckpt='runs/a/epoch=3-step=100.ckpt'",
        "+ckpt_path='x=y'",
        "mask.ratio=0.5",
        "-m",
        "ckpt='already=quoted'",
        "x=range(start=1,stop=3)",
        "--config-dir",
        "a=b=c",
    ]
    check_overrides(["ckpt='a=b'", "x=range(start=1,stop=3)", "ckpt=plain"])
    with pytest.raises(
        ConfigError, match=r"""a value holding '=' must be quoted for Hydra, e.g. "ckpt='a=1.ckpt,b=2.ckpt'\""""
    ):
        check_overrides(["ckpt=a=1.ckpt,b=2.ckpt"])


@pytest.mark.slow  # trains (in this process)
def test_lightning_checkpoint_names_as_ckpt_and_ckpt_path(trained, tmp_path, capsys):
    named = tmp_path / "ckpts" / "epoch=0-step=2.ckpt"
    named.parent.mkdir()
    shutil.copy(trained / "checkpoints" / "last.ckpt", named)
    code = run_main(
        tr.main,
        "mimzoo-train",
        *TINY,
        *QUICK[1:],
        "trainer.max_steps=3",
        f"ckpt_path={named}",
        f"hydra.run.dir={tmp_path / 'resumed'}",
    )
    assert code == 0
    assert torch.load(tmp_path / "resumed" / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == 3
    code = run_main(
        ev.main, "mimzoo-eval", "protocol=knn", f"ckpt={named}", *EVAL_FAST, f"hydra.run.dir={tmp_path / 'eval'}"
    )
    assert code == 0 and json.loads((tmp_path / "eval" / "results.json").read_text())["ckpt"] == str(named)
    code = run_main(ev.main, "mimzoo-eval", "protocol=knn", "ckpt=a=1.ckpt,b=2.ckpt", *EVAL_FAST)
    assert code == 2 and "ckpt='a=1.ckpt,b=2.ckpt'" in error_line(capsys, "mimzoo-eval")


# --- the tiny encoder's decoder ----------------------------------------------------------------------------
def compose_train(*overrides):
    with initialize_config_dir(config_dir=tr.CONFIG_DIR, version_base="1.3"):
        return compose("train", overrides=list(overrides))


def test_tiny_encoder_brings_a_tiny_decoder():
    decoder = compose_train("model/encoder=test").model.decoder
    assert (decoder.dim, decoder.depth, decoder.num_heads) == (32, 1, 2)
    model = tr.build_model(compose_train("model/encoder=test", "data=cifar10_mini"))
    assert sum(p.numel() for p in model.parameters()) < 100_000  # was 25.3 M with MAE's 512 x 8 decoder
    assert compose_train("model=sgmae", "model/encoder=test").model.decoder.dim == 32
    assert compose_train("model=convmae", "model/convmae_encoder=test").model.decoder.dim == 32
    # Standard sizes keep MAE's decoder; overrides and presets still win; models without a decoder get none.
    assert compose_train("model/encoder=vit_small").model.decoder.dim == 512
    assert compose_train("model/encoder=test", "model.decoder.dim=64").model.decoder.dim == 64
    assert compose_train("model/encoder=test", "experiment=mae_cifar").model.decoder.dim == 256
    assert "decoder" not in compose_train("model=ibot", "model/encoder=test").model


# --- how errors reach the user -----------------------------------------------------------------------------
def test_only_user_errors_become_one_line(capsys):
    from hydra.errors import InstantiationException

    with pytest.raises(RuntimeError):  # a bug keeps its traceback
        with user_errors("mimzoo-x"):
            raise RuntimeError("bug")
    with pytest.raises(KeyError):  # a bug raised while handling a user error is still a bug
        with user_errors("mimzoo-x"):
            try:
                raise ConfigError("bad key")
            except ConfigError:
                raise KeyError("bug")  # noqa: B904 (implicit chaining, as a bug in a handler raises)
    with pytest.raises(SystemExit) as exit_info:  # wrapped by Hydra's instantiate: still the user's message
        with user_errors("mimzoo-x"):
            try:
                raise CheckpointError("bad\nfile")
            except CheckpointError as err:
                raise InstantiationException("Error in call to target") from err
    assert exit_info.value.code == 2 and capsys.readouterr().err == "mimzoo-x: error: bad file\n"
    wrapped = DataError(
        "Caught DataError in DataLoader worker process 0.\nOriginal Traceback (most recent call last):\n"
        '  File "x.py", line 1\nmimzoo.errors.DataError: unreadable image /a/b.png (truncated)\n'
    )
    assert one_line(wrapped) == "unreadable image /a/b.png (truncated)"
