import os
import sys

# Spawned ranks import test modules by name: keep tests/ importable in every process.
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
