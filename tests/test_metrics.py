from lckv_stream.metrics import ConversationMetrics


def test_the_latency_series_keeps_every_token_while_they_fit():
    metrics = ConversationMetrics()
    for ms in (1.0, 2.0, 3.0):
        metrics.record_token(ms)
    assert metrics.latency_series(5) == [(1, 1.0), (2, 2.0), (3, 3.0)]


def test_a_long_series_is_runs_of_tokens_averaged_into_a_bounded_number_of_points():
    metrics = ConversationMetrics()
    for token in range(1, 1001):
        metrics.record_token(float(token))
    series = metrics.latency_series(300)
    assert len(series) <= 300 and series[-1][0] == 1000
    run = 4  # ceil(1000 / 300)
    assert series[0] == (run, sum(range(1, run + 1)) / run)
    assert [token for token, _ in series] == sorted(token for token, _ in series)
    # Every token counts once: the runs' means weighted by their lengths give the overall mean.
    lengths = [b - a for (a, _), (b, _) in zip([(0, 0)] + series, series)]
    assert abs(sum(n * ms for n, (_, ms) in zip(lengths, series)) / 1000 - 500.5) < 1e-9
