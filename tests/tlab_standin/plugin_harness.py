"""STAND-IN for TransformerLab's plugin_harness.py (tests only): import the plugin's main and call main()."""

import argparse
import sys

parser = argparse.ArgumentParser()
parser.add_argument("--plugin_dir", required=True)
args, _ = parser.parse_known_args()
sys.path.append(args.plugin_dir)  # the plugin imports its own files (and this folder's SDK) from here

import main

if callable(getattr(main, "main", None)):
    main.main()
