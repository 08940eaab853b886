"""The one exception type for bad user input: main.py prints its message as one line and exits 2."""


class UserError(Exception):
  """A problem the user can fix (config, data, workdir). The message names the problem and the fix."""
