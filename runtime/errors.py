"""The one error type users see: a message that names the problem and the fix."""


class FastDiffError(Exception):
    """A problem with the user's input, artifact or machine, reported without a traceback."""

    def __init__(self, problem: str, fix: str | None = None) -> None:
        self.problem = problem
        self.fix = fix
        super().__init__(problem if fix is None else f"{problem}\n  fix: {fix}")
