"""bench/serve_http.py's compute floor of p50 TTFT: measured on the bench's own model and adapters, and reported in
the table against the older server's p50."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
import serve_http  # noqa: E402


def test_prefill_floor_is_measured_and_reported(tmp_path):
    args = serve_http.parse_args(["--quick", "--clients", "1,4"])
    serve_http.build(tmp_path, args)
    floor, group = serve_http.prefill_floor(tmp_path, args, repeats=1)
    assert floor > 0 and group in (1, 2)  # the median request of a burst of 4 waits for 2 prompts' prefill
    args.floor, args.load = (floor, group), 0.0
    row = dict(requests=8, tok_s=100.0, ttft50=0.2, ttft99=0.3, p50=1.0, p99=1.2, mean_batch=4.0, errors=0)
    text = serve_http.table({"this lorakit": [{**row, "clients": 4}],
                             "old (older)": [{**row, "clients": 4, "ttft50": 0.4}]}, args, [200.0])
    assert f"takes {floor:.3f} s here" in text
    assert "p50 TTFT 0.50× the older server's" in text and f"the floor is {floor / 0.4:.2f}× it" in text
    assert "tokens/s 0.50× plain `generate`" in text
