"""A local iKhokha: the iK Pay API, a hosted payment page, and signed callbacks."""
