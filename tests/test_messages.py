"""How errors and addresses are shown to people: one line, never a credential."""
import pytest

from pipeline.errors import first_line, without_credentials


@pytest.mark.parametrize("uri, shown", [
    ("https://bot:s3cret@mlflow.corp:8443/ml/", "https://mlflow.corp:8443/ml/"),
    ("http://user:p@ss@127.0.0.1:5000", "http://127.0.0.1:5000"),  # an unencoded @ in the password
    ("s3://AKIA:secret@bucket/photos/", "s3://bucket/photos/"),
    ("s3://bucket/photos/", "s3://bucket/photos/"),
    ("sqlite:////srv/mlflow.db", "sqlite:////srv/mlflow.db"),
    ("models:/classifier@champion", "models:/classifier@champion"),  # an alias, not a user
    ("/data/photos", "/data/photos"),
])
def test_credentials_never_shown(uri, shown):
    assert without_credentials(uri) == shown


def test_first_line_of_an_error():
    assert first_line(ValueError("bad input\ntraceback details")) == "bad input"
    assert first_line(ValueError("bad\nmore"), with_type=True) == "ValueError: bad"
    assert first_line(KeyError()) == "KeyError"
    assert first_line(RuntimeError("x" * 1000)) == "x" * 300
    assert len(first_line(RuntimeError("y" * 1000), limit=500)) == 500
