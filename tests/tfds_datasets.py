"""Three TFDS datasets for the tests, defined here and so registered by name on import (once per process):
nothing is downloaded."""

import requests
import tensorflow_datasets as tfds


class LmTestText(tfds.core.GeneratorBasedBuilder):
  """lm_test_text: 20 train and 5 validation documents, generated in place."""

  VERSION = tfds.core.Version("1.0.0")

  def _info(self):
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({"text": tfds.features.Text()}))

  def _split_generators(self, dl_manager):
    return {"train": self._generate_examples("train", 20), "validation": self._generate_examples("validation", 5)}

  def _generate_examples(self, split, count):
    for i in range(count):
      yield i, {"text": f"{split} document {i}: " + "word " * i}


class LmTestOffline(tfds.core.GeneratorBasedBuilder):
  """lm_test_offline: its download fails as it does without a network."""

  VERSION = tfds.core.Version("1.0.0")

  def _info(self):
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({"text": tfds.features.Text()}))

  def _split_generators(self, dl_manager):
    raise requests.exceptions.ConnectionError("Failed to resolve 'example.org' ([Errno -3] Temporary failure in "
                                              "name resolution)")

  def _generate_examples(self):
    yield from ()


class LmTestUnreachable(tfds.core.GeneratorBasedBuilder):
  """lm_test_unreachable: its files are on a host that never resolves (.invalid, RFC 6761). TFDS would retry
  such a download for minutes; it must not be tried."""

  VERSION = tfds.core.Version("1.0.0")
  url_infos = {"https://lm-test.invalid/corpus.txt": None}  # what TFDS reads from a dataset's checksums.tsv

  def _info(self):
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({"text": tfds.features.Text()}))

  def _split_generators(self, dl_manager):
    raise requests.exceptions.RetryError("the download was tried (TFDS retries it for minutes)")

  def _generate_examples(self):
    yield from ()
