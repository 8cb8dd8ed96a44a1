"""The one exception bad user input raises, so notebooks and scripts can show it without a traceback."""


class DataError(ValueError):
    """User data (a file, a row, a folder, a split file) is wrong; the message names it and says what is wrong."""
