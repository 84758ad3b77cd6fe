from django.http import HttpRequest, JsonResponse

from cachesync.contrib.django import cached_get

from .models import Article


def article(request: HttpRequest, pk: int) -> JsonResponse:
    """GET /articles/<pk>: the row through the cache ("article:{id}" from the rules); 404 when missing."""
    return JsonResponse(cached_get(Article, id=pk))
