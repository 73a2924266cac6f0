#!/usr/bin/env python3
"""Prints the objects of one render of the mailrelay-operator chart as a JSON list.

Used by operator/tests/it/rbac.rs (and handy by hand), with the same Helm engine
(PyPI helm-python-sdk) as test_chart.py:

    python3 charts/tests/render.py --name mr --namespace mail --values '{"watchNamespaces": ["a"]}'
"""

import argparse
import json
import os
import sys

import helm_python
import yaml

CHART = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "mailrelay-operator"))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--name", default="mr")
    ap.add_argument("--namespace", default="mail")
    ap.add_argument("--values", default="{}", help="values as a JSON object")
    args = ap.parse_args()
    values = json.loads(args.values)
    chart = helm_python.Chart.load(CHART)
    chart.validate_schema(values)
    out = chart.render(values, name=args.name, namespace=args.namespace, is_install=True)
    objects = []
    for path, text in sorted(out.items()):
        if path.endswith("NOTES.txt"):
            continue
        objects.extend(d for d in yaml.safe_load_all(text) if d)
    json.dump(objects, sys.stdout)


if __name__ == "__main__":
    main()
