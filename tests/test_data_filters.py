"""Fast units of the data build: filter expressions, metadata columns of URL lists, task slices, the min-side
default, and the launch flags pixeldit-data shares with pixeldit-submit. No network, no process."""
from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from data_pipeline.build import task_slices
from data_pipeline.buckets import bucket_table, min_bucket_side
from data_pipeline.cli import build_options, build_parser
from data_pipeline.dataset_format import SAMPLES_SCHEMA, concat_samples, conform_samples, meta_columns
from data_pipeline.filter_syntax import FilterSyntaxError
from data_pipeline.filters import parse_filter
from data_pipeline.ingest import IngestConfig, parse_meta_cols
from data_pipeline.inputs import prepare_url_list
from data_pipeline.reasons import Skip
from data_pipeline.shard import ShardConfig

TABLE = pa.table({
    "aesthetic": pa.array([5.0, 6.5, None, 7.0, 6.0], pa.float64()),
    "punsafe": pa.array([0.0, 0.2, 0.01, 0.05, None], pa.float64()),
    "license": pa.array(["cc0", "nc", None, "cc-by", "cc0"], pa.string()),
    "width": pa.array([10, 20, 30, 40, 50], pa.int64()),
    "nsfw": pa.array([True, False, None, False, False], pa.bool_()),
    "clip score": pa.array([0.1, 0.4, 0.5, 0.2, 0.3], pa.float64()),
})


@pytest.mark.parametrize("expression,rows", [
    ("aesthetic >= 6 and punsafe < 0.1", [3]),  # null punsafe (row 4) and null aesthetic (row 2) are left out
    ("aesthetic >= 6", [1, 3, 4]),
    ("not aesthetic >= 6", [0]),  # not null is null: row 2 stays out
    ("aesthetic is null or aesthetic < 6", [0, 2]),
    ("punsafe is not null and punsafe <= 0.01", [0, 2]),
    ("license in ('cc0', \"cc-by\")", [0, 3, 4]),
    ("license not in ('cc0')", [1, 3]),
    ("license == 'nc' or license != 'nc' and width > 35", [1, 3, 4]),  # and binds tighter than or
    ("(license == 'nc' or license != 'nc') and width > 35", [3, 4]),
    ("width * width >= 400 and not nsfw", [1, 3, 4]),
    ("width / 3 > 6.5", [1, 2, 3, 4]),  # true division
    ("-width < -35 or width - 5 == 5", [0, 3, 4]),
    ("`clip score` > 0.3", [1, 2]),
    ("nsfw", [0]),
    ("nsfw == false", [1, 3, 4]),
    ("1 < 2", [0, 1, 2, 3, 4]),
    ("aesthetic >= 6 AND width < 45", [1, 3]),  # keywords in any case
])
def test_filter_selects_exactly_the_expected_rows(expression, rows):
    mask = parse_filter(expression).mask(TABLE)
    assert np.flatnonzero(mask).tolist() == rows


@pytest.mark.parametrize("expression,message", [
    ("aesthetic >== 6", "unexpected '=' at character 13"),
    ("aesthetic >= ", "expected a column, a number, a string or '(' at character 14, found the end"),
    ("", "is empty"),
    ("aesthetic >= 6 punsafe", "expected an operator"),
    ("(aesthetic >= 6", "expected ')'"),
    ("license in (cc0)", "expected a number or a quoted string"),
    ("__import__('os').system('x')", "unexpected '.' at character 17"),  # no Python is ever evaluated
])
def test_syntax_errors_name_the_place(expression, message):
    with pytest.raises(FilterSyntaxError, match=message.replace("(", r"\(").replace(")", r"\)")):
        parse_filter(expression)


@pytest.mark.parametrize("expression,message", [
    ("aesthetics >= 6", "no column 'aesthetics' in x/samples.parquet; its columns: aesthetic, punsafe, license, "
                        "width, nsfw, clip score"),
    ("license > 3", "cannot apply '>' to a string and a number"),
    ("width + 1", "the expression is not a condition"),
    ("nsfw > true", "cannot apply '>' to a bool and a bool"),
    ("width in (1, 'a')", "cannot apply 'in' to a number and a string"),
])
def test_column_and_type_errors_name_the_column(expression, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        parse_filter(expression).check(TABLE.schema, "x/samples.parquet")


def test_filter_reports_the_columns_it_reads():
    assert parse_filter("aesthetic > 5 and (`clip score` > 0.2 or aesthetic is null)").columns == \
        ["aesthetic", "clip score"]


@pytest.mark.parametrize("n,tasks", [(0, 3), (1, 3), (5, 3), (6, 3), (7, 2), (100, 7), (3, 1)])
def test_task_slices_are_contiguous_disjoint_balanced_and_cover(n, tasks):
    slices = task_slices(n, tasks)
    assert len(slices) == max(1, min(tasks, n))
    assert [i for a, b in slices for i in range(a, b)] == list(range(n))
    sizes = [b - a for a, b in slices]
    assert max(sizes) - min(sizes) <= 1
    assert task_slices(n, tasks) == slices  # deterministic


def test_min_side_default_follows_the_smallest_bucket_of_the_table():
    assert min_bucket_side(bucket_table(512)) == 256 and min_bucket_side(bucket_table(1024)) == 512
    assert ShardConfig().shortest_side == 256
    assert ShardConfig(base_res=256).shortest_side == 128
    assert ShardConfig(min_side=0).shortest_side == 0  # keeps an 8x8 image
    a = build_parser().parse_args(["shard", "ing", "--out", "o"])
    assert a.min_side is None and ShardConfig(min_side=a.min_side).limits.min_side == 256


def test_meta_col_names_are_checked():
    assert parse_meta_cols(["aesthetic", "WIDTH:input_width"]) == (("aesthetic", "aesthetic"), ("WIDTH", "input_width"))
    with pytest.raises(ValueError, match="the name 'width' is taken .* WIDTH:input_width"):
        IngestConfig(meta_cols=("WIDTH:width",))
    with pytest.raises(ValueError, match="the name 'sha256' is taken"):
        IngestConfig(meta_cols=("sha256",))
    with pytest.raises(ValueError, match="repeat"):
        IngestConfig(meta_cols=("a:x", "b:x"))
    with pytest.raises(ValueError, match="at character"):
        IngestConfig(filter="aesthetic >")


def _laion_like(tmp_path, fmt: str) -> str:
    rows = [
        {"URL": "http://h/1.jpg", "TEXT": "one", "aesthetic": 6.5, "punsafe": 0.01, "WIDTH": 640, "LICENSE": "cc0",
         "faces": [[1, 2, 3, 4]]},
        {"URL": "http://h/2.jpg", "TEXT": "two", "aesthetic": 4.0, "punsafe": 0.5, "WIDTH": 320, "LICENSE": None,
         "faces": []},
        {"URL": "http://h/3.jpg", "TEXT": "three", "aesthetic": None, "punsafe": 0.0, "WIDTH": 800,
         "LICENSE": "nc", "faces": None},
        {"URL": "http://h/1.jpg", "TEXT": "again", "aesthetic": 9.0, "punsafe": 0.0, "WIDTH": 10, "LICENSE": "x",
         "faces": []},
        {"URL": "http://h/4.jpg", "TEXT": "four", "aesthetic": 7.0, "punsafe": 0.02, "WIDTH": 1024,
         "LICENSE": "cc-by", "faces": []},
    ]
    path = str(tmp_path / f"laion.{fmt}")
    if fmt == "parquet":
        pq.write_table(pa.Table.from_pylist(rows), path)
    elif fmt == "jsonl":
        with open(path, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
    else:
        import csv

        with open(path, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=[k for k in rows[0] if k != "faces"], extrasaction="ignore")
            w.writeheader()
            w.writerows(rows)
    return path


@pytest.mark.parametrize("fmt", ["parquet", "jsonl", "csv"])
def test_url_list_metadata_keeps_its_types_and_filters_before_download(tmp_path, fmt):
    path = _laion_like(tmp_path, fmt)
    meta = (("aesthetic", "aesthetic"), ("punsafe", "punsafe"), ("WIDTH", "input_width"), ("LICENSE", "license"))
    prep = prepare_url_list(path, url_col="URL", caption_col="TEXT", meta_cols=meta)
    t = prep.table
    assert t.schema.field("aesthetic").type == pa.float64() and t.schema.field("input_width").type == pa.int64()
    assert t.schema.field("license").type == pa.string()
    assert t.column("input_width").to_pylist() == [640, 320, 800, 1024]  # the repeated URL is gone
    assert t.column("aesthetic").to_pylist() == [6.5, 4.0, None, 7.0]
    assert t.column("license").to_pylist()[:2] == ["cc0", None if fmt != "csv" else ""]  # CSV: empty, not null
    kept = prepare_url_list(path, url_col="URL", caption_col="TEXT", meta_cols=meta,
                            row_filter=parse_filter("aesthetic >= 6 and punsafe < 0.1"))
    # the filter runs before the URL dedupe: row 4 (a repeat of row 1's URL, aesthetic 9) is dropped as duplicate
    assert kept.table.column("caption").to_pylist() == ["one", "four"]
    assert kept.skipped == {Skip.FILTERED.value: 2, Skip.DUPLICATE_URL.value: 1}
    if fmt != "csv":
        faces = prepare_url_list(path, url_col="URL", caption_col="TEXT", meta_cols=(("faces", "faces"),))
        assert faces.table.column("faces").to_pylist()[0] == "[[1, 2, 3, 4]]"  # nested values as JSON text
    with pytest.raises(ValueError, match="no column 'score' in the metadata columns of .*laion"):
        prepare_url_list(path, url_col="URL", caption_col="TEXT", meta_cols=meta, row_filter=parse_filter("score > 1"))


def test_samples_tables_keep_metadata_columns_and_merge_them():
    core = {f.name: pa.array([], f.type) for f in SAMPLES_SCHEMA}
    empty = pa.table(core)

    def part(n: int, **meta) -> pa.Table:
        t = pa.table({f.name: pa.nulls(n, f.type) for f in SAMPLES_SCHEMA})
        for k, v in meta.items():
            t = t.append_column(k, v)
        return t

    a = part(2, aesthetic=pa.array([6, 7], pa.int64()))
    b = part(1, aesthetic=pa.array([6.5]), license=pa.array(["cc0"]))
    merged = concat_samples([a, b, empty])
    assert meta_columns(merged.schema) == ["aesthetic", "license"]
    assert merged.schema.field("aesthetic").type == pa.float64()  # int64 next to float64 widens
    assert merged.column("aesthetic").to_pylist() == [6.0, 7.0, 6.5]
    assert merged.column("license").to_pylist() == [None, None, "cc0"]
    assert conform_samples(merged).schema.names[: len(SAMPLES_SCHEMA)] == SAMPLES_SCHEMA.names
    with pytest.raises(ValueError, match="metadata column 'license' is string in one part"):
        concat_samples([b, part(1, license=pa.array([1.0]))])


RESOURCES = ["--cluster", "slurm", "--partition", "cpu", "--account", "proj", "--qos", "low", "--time-min", "90",
             "--mem-gb", "64", "--cpus-per-task", "16", "--constraint", "amd", "--job-name", "data",
             "--sbatch", "exclusive", "--env", "TMPDIR=/scratch"]


def test_data_commands_take_the_launch_flags_of_pixeldit_submit():
    from launchers.cli import build_parser as submit_parser
    from launchers.cli import launch_config

    data = build_options(build_parser().parse_args(["shard", "ing", "--out", "o", "--tasks", "8", *RESOURCES]))
    train = launch_config(submit_parser().parse_args(["submit", *RESOURCES]))
    assert data.tasks == 8 and data.launch == train  # one definition: same flags, same meaning, same defaults
    inline = build_options(build_parser().parse_args(["ingest", "u.parquet", "--out", "o"]))
    assert inline.launch is None and inline.tasks == 1  # no --cluster: the tasks run in this process
    with pytest.raises(ValueError, match="time_min .* required on SLURM"):
        build_options(build_parser().parse_args(["shard", "ing", "--out", "o", "--cluster", "slurm"]))
