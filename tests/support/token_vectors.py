"""Phoenix.Token test vectors minted by plug_crypto, shared by the verifier and config tests."""

VECTOR_SECRET = (
    "phxbroker-test-secret-key-base-0123456789abcdefghijklmnopqrstuvwxyz0123456789ABCDEF"
)
VECTORS = [
    {
        "name": "int_user",
        "data": 42,
        "max_age_s": 86400,
        "salt": "user socket",
        "secret_key_base": VECTOR_SECRET,
        "signed_at_ms": 1795000000000,
        "token": "SFMyNTY.g2gDYSpuBgAAXlbuoQFiAAFRgA.3a_9YYk9kq9urajztNxzJmLERRYSUaoDzK7bM3R9u7A",
    },
    {
        "name": "string_user",
        "data": "alice",
        "max_age_s": 86400,
        "salt": "user socket",
        "secret_key_base": VECTOR_SECRET,
        "signed_at_ms": 1795000000000,
        "token": "SFMyNTY."
        "g2gDbQAAAAVhbGljZW4GAABeVu6hAWIAAVGA."
        "zxojUI38CYVodd5cb9rpD3B2RORHWTREmSWLujPnEOM",
    },
    {
        "name": "map_user",
        "data": {"id": 7, "role": "admin"},
        "max_age_s": 1209600,
        "salt": "user socket",
        "secret_key_base": VECTOR_SECRET,
        "signed_at_ms": 1795000000000,
        "token": "SFMyNTY."
        "g2gDdAAAAAJtAAAAAmlkYQdtAAAABHJvbGVtAAAABWFkbWlubgYAAF5W7qEBYgASdQA."
        "F4o13ataQ2eqiPhzdYQ7C-fFY8widLlpkaNfyC_fCLI",
    },
    {
        "name": "other_salt",
        "data": "bob",
        "max_age_s": 86400,
        "salt": "other salt",
        "secret_key_base": VECTOR_SECRET,
        "signed_at_ms": 1795000000000,
        "token": "SFMyNTY."
        "g2gDbQAAAANib2JuBgAAXlbuoQFiAAFRgA."
        "jaY04jiLInv6wc3fIKuEbQtAQV8LHNrgvYYdeAfeQO8",
    },
    {
        "name": "unicode_user",
        "data": "zoë",
        "max_age_s": 86400,
        "salt": "user socket",
        "secret_key_base": VECTOR_SECRET,
        "signed_at_ms": 1795000000000,
        "token": "SFMyNTY."
        "g2gDbQAAAAR6b8OrbgYAAF5W7qEBYgABUYA."
        "X1cP85784A0D0_AiSzVrD2gFnXwoWF318nkdYoSXnoY",
    },
    {
        "name": "big_int_user",
        "data": 12345678901234567890,
        "max_age_s": 86400,
        "salt": "user socket",
        "secret_key_base": VECTOR_SECRET,
        "signed_at_ms": 1795000000000,
        "token": "SFMyNTY."
        "g2gDbggA0gof64ypVKtuBgAAXlbuoQFiAAFRgA."
        "JvPWB13iT1oshCLbOCk_Hv1lMNQfWPOlClkX3SBW_vU",
    },
    {
        "name": "list_user",
        "data": [1, "two", {"atom": "three"}],
        "max_age_s": 86400,
        "salt": "user socket",
        "secret_key_base": VECTOR_SECRET,
        "signed_at_ms": 1795000000000,
        "token": "SFMyNTY."
        "g2gDbAAAAANhAW0AAAADdHdvZAAFdGhyZWVqbgYAAF5W7qEBYgABUYA."
        "2-isBOgxqYki0lWRn1g1DHxcagZLVWkTTcE_5nxZk7w",
    },
]
