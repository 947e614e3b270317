from quantune.lib.tb import TBWriter, read_scalars


def test_writer_logs_scalars_with_system_tags(tmp_path):
    with TBWriter(tmp_path / "tb") as tb:
        for step in range(3):
            tb.scalars({"train/loss": 3.0 - step, "train/lr": 1e-3}, step)
        tb.final({"ppl": 12.0, "name": "ignored"})
    s = read_scalars(tmp_path / "tb")
    assert [v for _, v in s["train/loss"]] == [3.0, 2.0, 1.0]
    assert {"system/wall_s", "system/peak_mem_mb", "final/ppl"} <= set(s)
    assert s["system/peak_mem_mb"][0][1] > 1.0
