import os
import sys

# spawned ranks import the scenario modules that sit beside the tests
sys.path.insert(0, os.path.dirname(__file__))
