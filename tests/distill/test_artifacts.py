"""What ``atom-fast evaluate`` reads (atom_fast/distill/artifacts.py): DC's res_*.pt besides plain
dicts, and every bad set (unreadable, keys missing, labels out of range or not matching, another image
shape) as one line. The fixtures: conftest.py."""

import json

import pytest
import torch


def test_evaluate_reads_the_dc_format(evaluate_cli, plain_set, tmp_path):
    s = torch.load(plain_set)
    dc = tmp_path / "res_DM_folder_ConvNet_2ipc.pt"
    torch.save({"data": [[s["images"], s["labels"]]], "accs_all_exps": {}}, dc)
    assert evaluate_cli(dc, tmp_path / "dc", "--eval-model", "mlp", "--no-baseline") == 0
    r = json.loads((tmp_path / "dc" / "results.json").read_text())
    assert r["format"] == "dc" and r["baseline"] is None


@pytest.mark.parametrize("content,needle", [
    ({"images": torch.zeros(6, 3, 32, 32)}, "has no 'labels'"),
    ({"labels": torch.zeros(6, dtype=torch.long)}, "has no 'images'"),
    ({"images": torch.zeros(6, 3, 32, 32), "labels": torch.arange(6)}, "out of range"),
    ({"images": torch.zeros(6, 1, 28, 28), "labels": torch.zeros(6, dtype=torch.long)},
     "(1, 28, 28) (C, H, W) but the folder test images are (3, 32, 32)"),
    ({"images": torch.zeros(6, 3, 32, 32), "labels": torch.zeros(5, dtype=torch.long)},
     "labels must be an integer (6,) tensor"),
    ("not a tensor file", "not a readable tensor file"),
])
def test_evaluate_bad_sets_are_one_line(evaluate_cli, tmp_path, capsys, content, needle):
    path = tmp_path / "bad.pt"
    if isinstance(content, str):
        path.write_text(content)
    else:
        torch.save(content, path)
    assert evaluate_cli(path, tmp_path / "out") == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err and needle in err, err
    assert err.count("atom-fast: error:") == 1
