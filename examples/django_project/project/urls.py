from django.urls import path

from shop import views

urlpatterns = [path("articles/<int:pk>", views.article)]
