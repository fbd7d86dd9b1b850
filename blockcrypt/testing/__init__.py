"""Test-only hooks compiled into the product: named crash points that fire only
when a ``BLOCKCRYPT_TESTONLY_*`` variable asks for them."""
