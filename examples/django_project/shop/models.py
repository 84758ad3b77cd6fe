from django.db import models

from cachesync.contrib.django import CachesyncManager


class Tag(models.Model):
    name = models.CharField(max_length=50)

    objects = CachesyncManager()  # no unique field but the pk: bulk_create(ignore_conflicts=True) is refused


class Article(models.Model):
    slug = models.CharField(max_length=100, unique=True)
    title = models.CharField(max_length=200)
    version = models.IntegerField(default=1)
    tags = models.ManyToManyField(Tag, related_name="articles")

    objects = CachesyncManager()  # bulk QuerySet.update() records its rows' keys too


class Comment(models.Model):
    article = models.ForeignKey(Article, on_delete=models.CASCADE, related_name="comments")
    body = models.CharField(max_length=200)

    objects = CachesyncManager()  # its rule's key is the foreign key column (comments:{article_id})
