"""Helper apps the tests import (as ``apps.NAME``) or start as child processes."""
