import pytest
import torch


@pytest.fixture(autouse=True)
def _seed_and_threads():
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="session")
def corpus_files():
    """A few dozen stdlib modules: a real Python corpus that trains a tokenizer in about a second."""
    from nanoseek.data import stdlib_files

    files = stdlib_files()
    return files[:: max(1, len(files) // 40)]


@pytest.fixture(scope="session")
def tokenizer(corpus_files):
    from nanoseek.data import iter_texts
    from nanoseek.tokenizer import train_tokenizer

    return train_tokenizer(iter_texts(corpus_files), vocab_size=512, show_progress=False)


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory, corpus_files, tokenizer):
    from nanoseek.data import prepare

    out = tmp_path_factory.mktemp("data")
    prepare(corpus_files, tokenizer, out, val_permille=100, progress=False)
    tokenizer.save(out / "tokenizer")
    return out
