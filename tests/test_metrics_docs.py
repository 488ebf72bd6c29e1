"""Every sample /metrics answers is in the README's metrics table: an admin reading a scrape finds each name.

prometheus_client writes a ``_created`` sample beside each counter and
histogram; the table did not name them, so a scrape showed five series
nobody had explained.
"""

import os
import re

from prometheus_client.parser import text_string_to_metric_families

from mkiso.http import application

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")
HISTOGRAM_SAMPLES = ("_bucket", "_count", "_sum")  # Prometheus' own, of every histogram the table names


def documented_names():
    """The metric names of the README's metrics table; "`a_hits_total`, `_misses_total`" names
    a_misses_total too (the row's shorthand)."""
    with open(README, encoding="utf-8") as handle:
        section = handle.read().split("### Metrics (Prometheus)", 1)[1].split("\n## ", 1)[0]
    names = set()
    for row in (line for line in section.splitlines() if line.startswith("| `mkiso_")):
        previous = None
        for token in re.findall(r"`([a-z_]+)(?:\{[^}]*\})?`", row.split(" | ")[0]):
            if token.startswith("_") and previous:
                token = previous.rsplit("_", token.count("_"))[0] + token
            names.add(token)
            previous = token
    return names


def test_every_sample_of_a_scrape_is_in_the_readme(make_service, wsgi_call):
    service = make_service(metrics={"enabled": True})
    app = application.Application(service.config, service)
    assert wsgi_call(app, "/api/iso/download", query="accession_number=ACC2001").status == 200
    assert wsgi_call(app, "/api/iso/download", query="accession_number=NOSUCH1").status == 404
    text = wsgi_call(app, "/metrics").body.decode("utf-8")
    families = list(text_string_to_metric_families(text))
    documented = documented_names()
    undocumented = set()
    for family in families:
        for sample in family.samples:
            histogram_part = family.type == "histogram" and sample.name[len(family.name):] in HISTOGRAM_SAMPLES
            if sample.name not in documented and not (histogram_part and family.name in documented):
                undocumented.add(sample.name)
    assert {"mkiso_jobs_created", "mkiso_phase_seconds_created"} <= {
        sample.name for family in families for sample in family.samples}
    assert undocumented == set(), "in /metrics, not in the README's table: %s" % sorted(undocumented)
