"""The packed-batch layout: image slots, gathers, patchify, and where text loss applies."""

import jax.numpy as jnp
import numpy as np

from tfx_jax import layout


def hand_batch():
    # Row 0: doc1 = [BOS t BOI p p p p EOI t]; doc2 = [BOS BOI p p p p EOI]; padding.
    # Row 1: one doc with two images back to back (image ids 1 and 2), then padding.
    seg = np.array(
        [
            [1, 1, 1, 1, 1, 1, 1, 1, 1, 2, 2, 2, 2, 2, 2, 2, 0, 0],
            [1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0],
        ]
    )
    img = np.array(
        [
            [0, 0, 0, 1, 1, 1, 1, 0, 0, 0, 0, 1, 1, 1, 1, 0, 0, 0],
            [0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 0, 0, 0, 0, 0, 0, 0, 0],
        ]
    )
    return jnp.asarray(seg), jnp.asarray(img)


def test_image_slots_hand_example():
    seg, img = hand_batch()
    slot, start, valid = layout.image_slots(seg, img, max_images=3)
    np.testing.assert_array_equal(np.asarray(start), [[3, 11, 0], [2, 6, 0]])
    np.testing.assert_array_equal(np.asarray(valid), [[True, True, False], [True, True, False]])
    np.testing.assert_array_equal(
        np.asarray(slot)[0], [-1, -1, -1, 0, 0, 0, 0, -1, -1, -1, -1, 1, 1, 1, 1, -1, -1, -1]
    )
    # Images beyond max_images are not given a slot.
    slot1, _, valid1 = layout.image_slots(seg, img, max_images=1)
    assert np.asarray(valid1).tolist() == [[True], [True]]
    assert (np.asarray(slot1)[0, 11:15] == -1).all()


def test_gather_scatter_round_trip():
    seg, img = hand_batch()
    slot, start, _ = layout.image_slots(seg, img, max_images=3)
    x = jnp.arange(2 * 18 * 3, dtype=jnp.float32).reshape(2, 18, 3)
    gathered = layout.gather_image_tokens(x, start, num_patches=4)
    np.testing.assert_array_equal(np.asarray(gathered)[0, 1, :, 0], np.asarray(x)[0, 11:15, 0])
    back = layout.scatter_image_tokens(jnp.zeros_like(x), gathered, slot, start)
    is_img = np.asarray(img > 0)[:, :, None]
    np.testing.assert_array_equal(np.asarray(back), np.where(is_img, np.asarray(x), 0))


def test_patchify_inverts():
    lat = jnp.asarray(np.random.default_rng(0).normal(size=(2, 3, 8, 8, 4)), jnp.float32)
    p = layout.patchify(lat, 2)
    assert p.shape == (2, 3, 16, 16)
    # Patch 1 is the top row, second 2x2 block.
    np.testing.assert_array_equal(
        np.asarray(p)[0, 0, 1], np.asarray(lat)[0, 0, 0:2, 2:4].reshape(-1)
    )
    np.testing.assert_array_equal(np.asarray(layout.unpatchify(p, 2, 4)), np.asarray(lat))


def test_text_target_mask():
    seg, img = hand_batch()
    m = np.asarray(layout.text_target_mask(seg, img)).astype(int)[0]
    # t0->t1 yes; t1->BOI yes (the model learns to emit BOI); BOI->patch no; patches no;
    # EOI->text yes; last text of doc1 -> doc2 BOS no; doc2 BOS->BOI yes; padding no.
    np.testing.assert_array_equal(m, [1, 1, 0, 0, 0, 0, 0, 1, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0])


def test_text_before_image_marks_captions_that_precede_their_image():
    """Doc 1 is caption-first (BOS c c BOI p p EOI EOS), doc 2 image-first (BOS BOI p p EOI c
    EOS), then padding: doc 1's BOS and caption and doc 2's BOS are text before an image (BOI
    is not; a BOS is never a target, so only the caption leaves the LM loss)."""
    seg = np.array([[1, 1, 1, 1, 1, 1, 1, 1, 2, 2, 2, 2, 2, 2, 2, 0]])
    img = np.array([[0, 0, 0, 0, 1, 1, 0, 0, 0, 0, 1, 1, 0, 0, 0, 0]])
    want = np.zeros_like(seg, bool)
    want[0, [0, 1, 2, 8]] = True
    got = np.asarray(layout.text_before_image(jnp.asarray(seg), jnp.asarray(img)))
    np.testing.assert_array_equal(got, want)
