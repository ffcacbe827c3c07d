"""The one exception type that Mini LLM shows to users."""


class MiniLLMError(Exception):
    """A problem the user can fix. The message names the file or value and says what to do.

    The CLI prints it as one line and exits non-zero; the UI shows it in the page.
    """
